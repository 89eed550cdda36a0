"""The CLI accepts every flag of the original, with its defaults, and every flag reaches the configs."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from hyvideo import config
from hyvideo.constants import HUNYUAN_VIDEO_CONFIG

REPO = Path(__file__).resolve().parents[1]

# The original parser, flag by flag (official_spec.md §2.1-2.5): flag -> documented default.
ORIGINAL_FLAGS = {
    "--model": "HYVideo-T/2-cfgdistill",
    "--latent-channels": 16,
    "--precision": "bf16",
    "--rope-theta": 256,
    "--vae": "884-16c-hy",
    "--vae-precision": "fp16",
    "--vae-tiling": True,
    "--text-encoder": "llm",
    "--text-encoder-precision": "fp16",
    "--text-states-dim": 4096,
    "--text-len": 256,
    "--tokenizer": "llm",
    "--prompt-template": "dit-llm-encode",
    "--prompt-template-video": "dit-llm-encode-video",
    "--hidden-state-skip-layer": 2,
    "--apply-final-norm": False,
    "--text-encoder-2": "clipL",
    "--text-encoder-precision-2": "fp16",
    "--text-states-dim-2": 768,
    "--tokenizer-2": "clipL",
    "--text-len-2": 77,
    "--denoise-type": "flow",
    "--flow-shift": 7.0,
    "--flow-reverse": False,
    "--flow-solver": "euler",
    "--use-linear-quadratic-schedule": False,
    "--linear-schedule-end": 25,
    "--model-base": "ckpts",
    "--dit-weight": "ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt",
    "--model-resolution": "540p",
    "--load-key": "module",
    "--use-cpu-offload": False,
    "--batch-size": 1,
    "--infer-steps": 50,
    "--disable-autocast": False,
    "--save-path": "./results",
    "--save-path-suffix": "",
    "--name-suffix": "",
    "--num-videos": 1,
    "--video-size": (720, 1280),
    "--video-length": 129,
    "--prompt": None,
    "--seed-type": "auto",
    "--seed": None,
    "--neg-prompt": None,
    "--cfg-scale": 1.0,
    "--embedded-cfg-scale": 6.0,
    "--use-fp8": False,
    "--reproduce": False,
    "--ulysses-degree": 1,
    "--ring-degree": 1,
}
# Defaults we change on purpose (README "Flag reference" explains each).
OUR_DEFAULTS = {
    "--flow-reverse": True,  # the original's False samples backwards and yields noise
    "--dit-weight": None,  # resolved under --model-base
    "--flow-shift": None,  # resolved: 7.0, or 17.0 with --i2v-mode
    # None = chosen from torchrun's process count (1 x 1 in one process: RuntimeConfig records 1, as before)
    "--ulysses-degree": None,
    "--ring-degree": None,
}


@pytest.fixture(autouse=True)
def _no_model_base_env(monkeypatch):
    monkeypatch.delenv("MODEL_BASE", raising=False)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def test_every_original_flag_parses_to_its_default():
    parser = config.build_parser()
    known = {opt for action in parser._actions for opt in action.option_strings}
    missing = sorted(set(ORIGINAL_FLAGS) - known)
    assert not missing, f"original flags not accepted: {missing}"
    args = parser.parse_args([])
    for flag, default in ORIGINAL_FLAGS.items():
        expected = OUR_DEFAULTS.get(flag, default)
        value = getattr(args, _dest(flag))
        if isinstance(expected, tuple):
            value = tuple(value)
        assert value == expected, f"{flag}: {value!r} != {expected!r}"


def test_help_lists_every_original_flag():
    out = subprocess.run(
        [sys.executable, "sample_video.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for flag in ORIGINAL_FLAGS:
        assert flag in out.stdout, flag
    assert "--no-flow-reverse" in out.stdout and "--no-vae-tiling" in out.stdout


def test_original_example_command_parses():
    # scripts/run_sample_video.sh of the original, verbatim flags.
    argv = (
        "--video-size 720 1280 --video-length 129 --infer-steps 50 --prompt A_cat --seed 42 "
        "--embedded-cfg-scale 6.0 --flow-shift 7.0 --flow-reverse --use-cpu-offload "
        "--save-path ./results"
    ).split()
    cfg = config.parse_args(argv)
    assert cfg.sampling.flow_reverse and cfg.sampling.seed == 42 and cfg.runtime.offload_mode == "block"
    assert (cfg.sampling.height, cfg.sampling.width) == (720, 1280)
    assert config.parse_args(["--no-flow-reverse"]).sampling.flow_reverse is False
    assert config.parse_args(["--no-vae-tiling"]).model.vae_tiling is False
    assert config.parse_args(["--latent-channels", "16"]).model.dit.in_channels == 16


def _changed_value(action):
    """A valid non-default value for a flag."""
    if action.choices:
        # Single-choice flags get an out-of-choice value: only propagation is being tested here.
        return next((c for c in reversed(action.choices) if c != action.default), f"{action.default}_other")
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        return not action.default
    if action.nargs == "+":
        return [48, 80]
    if isinstance(action, argparse._AppendAction):  # repeatable flags (--lora, --lora-scale)
        return [0.5] if action.type is float else ["x.safetensors"]
    if action.type is int:
        return (action.default or 0) + 4
    if action.type is float:
        return (action.default or 0.0) + 0.5
    return "x" if action.default in (None, "") else action.default + "_x"


def test_every_flag_reaches_the_configs(tmp_path):
    parser = config.build_parser()
    base = config.configs_from_args(parser.parse_args([]))
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a dog\n\n# comment\na cat\n")
    ratios_file = tmp_path / "ratios.json"  # --cache-ratios is read while building the configs
    ratios_file.write_text("[1.0, 1.1]")
    files = {"prompt_file": str(prompt_file), "cache_ratios": str(ratios_file)}
    dropped = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.dest in config.NO_EFFECT_FLAGS:
            continue
        args = parser.parse_args([])
        reference = base
        if action.dest in ("lora_scale", "lora_ignore_alpha"):  # these act on the --lora flags
            args.lora = ["x.safetensors"]
            reference = config.configs_from_args(args)
        partners = {"i2v_dit_weight": ("i2v_mode", True), "use_lora": ("lora_path", "x.safetensors"),
                    "lora_path": ("use_lora", True)}  # flags that only act together with another
        if action.dest in partners:
            setattr(args, *partners[action.dest])
            reference = config.configs_from_args(args)
        value = files[action.dest] if action.dest in files else _changed_value(action)
        setattr(args, action.dest, value)
        if config.configs_from_args(args) == reference:
            dropped.append(action.dest)
    assert not dropped, f"flags parsed but never reaching the configs: {dropped}"


def test_no_effect_flags_are_documented():
    parser = config.build_parser()
    for action in parser._actions:
        if action.dest in config.NO_EFFECT_FLAGS:
            assert "No effect" in action.help, action.dest


def test_configs_are_frozen_dataclasses():
    cfg = config.parse_args([])
    for part in (cfg, cfg.model, cfg.sampling, cfg.runtime, cfg.model.dit):
        assert dataclasses.is_dataclass(part)
        with pytest.raises(dataclasses.FrozenInstanceError):
            part.__setattr__(dataclasses.fields(part)[0].name, None)


def test_model_base_moves_every_component():
    cfg = config.parse_args(["--model-base", "/weights"]).model
    for path in (cfg.dit_weight_path, cfg.vae_path, cfg.text_encoder_path, cfg.text_encoder_2_path):
        assert str(path).startswith("/weights/")
    assert config.parse_args(["--model-base", "/w", "--use-fp8"]).model.dit_weight_path.name.endswith(
        "_fp8.pt"
    )
    assert config.parse_args(["--dit-weight", "/x/dit.pt"]).model.dit_weight_path == Path("/x/dit.pt")


def test_single_video_size_means_square():
    cfg = config.parse_args(["--video-size", "544"])
    assert (cfg.sampling.height, cfg.sampling.width) == (544, 544)


def test_presets_and_overrides():
    cfg = config.parse_args(["--model", "HYVideo-T/2", "--rope-theta", "128"])
    assert cfg.model.dit.guidance_embed is False and cfg.model.dit.rope_theta == 128
    assert HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"].guidance_embed is True


def test_prompt_file_reads_nonblank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n  second prompt  \n# skipped\n", encoding="utf-8")
    assert config.parse_args(["--prompt-file", str(path)]).sampling.prompts == (
        "first prompt",
        "second prompt",
    )


BAD_VALUES = [
    (["--video-length", "10"], "--video-length"),
    (["--video-length", "0"], "--video-length"),
    (["--video-size", "0", "1280"], "--video-size"),
    (["--video-size", "-16"], "--video-size"),
    (["--video-size", "1", "2", "3"], "--video-size"),
    (["--infer-steps", "0"], "--infer-steps"),
    (["--num-videos", "0"], "--num-videos"),
    (["--flow-shift", "0"], "--flow-shift"),
    (["--latent-channels", "4"], "--latent-channels"),
    (["--model", "HYVideo-XL"], "--model"),
    (["--precision", "fp64"], "--precision"),
    (["--ulysses-degree", "0"], "--ulysses-degree"),
    (["--crf", "99"], "--crf"),
    (["--text-encoder", "clipL"], "--text-encoder"),
    (["--prompt", "   "], "--prompt"),
    (["--prompt", "a", "--prompt-file", "p.txt"], "--prompt-file"),
    (["--prompt-file", "/nonexistent/prompts.txt"], "--prompt-file"),
]


@pytest.mark.parametrize("argv,flag", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_exit_2_with_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        config.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert flag in err


def test_unknown_model_lists_valid_names(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(["--model", "nope"])
    err = capsys.readouterr().err
    assert all(name in err for name in HUNYUAN_VIDEO_CONFIG)


def test_misaligned_size_is_announced(caplog):
    with caplog.at_level("WARNING"):
        config.parse_args(["--video-size", "540", "960"])
    assert "rounded up to 544x960" in caplog.text


def test_no_effect_flag_is_announced(caplog):
    with caplog.at_level("WARNING"):
        config.parse_args(["--seed-type", "fixed"])
    assert "--seed-type has no effect" in caplog.text


def test_cli_bad_value_exits_2():
    out = subprocess.run(
        [sys.executable, "sample_video.py", "--video-length", "12"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--video-length" in out.stderr
