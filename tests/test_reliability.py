"""Bad input fails fast and cleanly: exit 2, one line naming the flag or file, no traceback, nothing written.

Also: the pre-load memory check, finite-latent checks, all-or-nothing outputs on a full disk, strict JSON,
and Ctrl-C / SIGTERM during sampling and writing (real subprocesses) leaving no file behind.
"""

from __future__ import annotations

import errno
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample_video
from hyvideo.testing.tiny import write_dit, write_tiny_checkpoints

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--video-size", "32", "32", "--video-length", "1", "--infer-steps", "2", "--precision", "fp32",
         "--vae-precision", "fp32", "--text-encoder-precision", "fp32", "--text-encoder-precision-2", "fp32"]
PROGRESS_BAR = re.compile(r"\d+%\|.*\|")
COMPONENTS = ("hunyuan-video-t2v-720p/transformers", "hunyuan-video-t2v-720p/vae", "text_encoder",
              "text_encoder_2")


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


def tree_with(tiny_tree: Path, root: Path, replace: str) -> Path:
    """A checkpoint tree linking to `tiny_tree`'s components, except `replace`, which is a fresh folder."""
    for component in COMPONENTS:
        target = root / component
        target.parent.mkdir(parents=True, exist_ok=True)
        if component == replace:
            target.mkdir()
        else:
            target.symlink_to(tiny_tree / component, target_is_directory=True)
    return root


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = sample_video.main(argv)
    except SystemExit as exc:  # flag validation exits from argparse
        code = exc.code
    return code, capsys.readouterr().err


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def assert_clean_failure(code: int, err: str, needle: str, save_dir: Path) -> None:
    assert code == 2, err
    # The denoising progress bar (tqdm, on stderr) may have drawn before the failure; the rest is one line.
    lines = [line for line in err.strip().splitlines() if not PROGRESS_BAR.search(line)]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert files_in(save_dir) == []


# --------------------------------------------------------------------------------------------------
# Flags refused at parse time (no checkpoint needed)
# --------------------------------------------------------------------------------------------------

PARSE_CASES = {
    "cfg-nan": (["--cfg-scale", "nan"], "--cfg-scale"),
    "cfg-inf": (["--cfg-scale", "inf"], "--cfg-scale"),
    "embedded-cfg-nan": (["--embedded-cfg-scale", "nan"], "--embedded-cfg-scale"),
    "flow-shift-nan": (["--flow-shift", "nan"], "--flow-shift"),
    "flow-shift-inf": (["--flow-shift", "-inf"], "--flow-shift"),
    "huge-size": (["--video-size", "100000", "100000"], "--video-size"),
    "huge-length": (["--video-length", "100001"], "--video-length"),
    "huge-steps": (["--infer-steps", "100000"], "--infer-steps"),
    "huge-num-videos": (["--num-videos", "1000"], "--num-videos"),
    "seed-2**64": (["--seed", str(2**64)], "--seed"),
    "seed-negative": (["--seed", "-1"], "--seed"),
    "seed-plus-videos": (["--seed", str(2**63 - 1), "--num-videos", "2"], "--seed"),
    "refused-encoder": (["--text-encoder", "clipL"], "--text-encoder"),
}


@pytest.mark.parametrize("extra,needle", PARSE_CASES.values(), ids=PARSE_CASES.keys())
def test_bad_flag_is_one_line_and_writes_nothing(tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    code, err = run_main(["--prompt", "x", "--model-base", str(tmp_path / "ckpts"), "--save-path", str(out),
                          *extra], capsys)
    assert_clean_failure(code, err, needle, tmp_path / "out")


def test_empty_save_path_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # today's bug wrote into the working directory
    code, err = run_main(["--prompt", "x", "--save-path", ""], capsys)
    assert_clean_failure(code, err, "--save-path", tmp_path)


@pytest.mark.parametrize("content", [b"\x00\x01\x02\xff\xfe binary", "a cat\na dog\n".encode("utf-16")],
                         ids=["binary", "utf-16"])
def test_unreadable_prompt_file_names_flag_and_file(tmp_path, capsys, content):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    code, err = run_main(["--prompt-file", str(prompts), "--save-path", str(tmp_path / "out")], capsys)
    assert_clean_failure(code, err, "--prompt-file", tmp_path / "out")
    assert str(prompts) in err


def test_utf8_bom_prompt_file_is_accepted(tmp_path):
    from hyvideo.config import read_prompt_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a cat\n猫\n".encode("utf-8-sig"))
    assert read_prompt_file(str(prompts)) == ("a cat", "猫")


def test_seed_bound_is_inclusive(tmp_path):
    from hyvideo.config import parse_args

    configs = parse_args(["--prompt", "x", "--seed", str(2**63 - 2), "--num-videos", "2"])
    assert configs.sampling.seed == 2**63 - 2


def test_help_shows_defaults_examples_and_only_accepted_choices():
    from hyvideo.config import build_parser

    text = build_parser().format_help()
    assert "(default: 50)" in text and "examples:" in text and text.count("python sample_video.py") == 2
    assert "--text-encoder {llm}" in text and "--tokenizer-2 {clipL}" in text


def test_neg_prompt_without_cfg_warns(caplog):
    from hyvideo.config import parse_args

    with caplog.at_level("WARNING"):
        parse_args(["--prompt", "x", "--neg-prompt", "blurry"])
    assert "--neg-prompt has no effect" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        parse_args(["--prompt", "x", "--neg-prompt", "blurry", "--cfg-scale", "2"])
    assert "--neg-prompt" not in caplog.text


# --------------------------------------------------------------------------------------------------
# Bad files, found while loading
# --------------------------------------------------------------------------------------------------


def corrupt_vae(folder: Path, tiny_tree: Path) -> str:
    src = tiny_tree / "hunyuan-video-t2v-720p" / "vae"
    (folder / "config.json").write_bytes((src / "config.json").read_bytes())
    data = (src / "pytorch_model.pt").read_bytes()
    (folder / "pytorch_model.pt").write_bytes(data[: len(data) // 2])  # a truncated download
    return str(folder / "pytorch_model.pt")


def pickle_text_encoder(folder: Path, tiny_tree: Path) -> str:
    src = tiny_tree / "text_encoder"
    for item in src.iterdir():
        if item.name != "model.safetensors" and item.is_file():
            (folder / item.name).write_bytes(item.read_bytes())
    torch.save({"not": "a model"}, folder / "model.safetensors")  # a pickle where safetensors belong
    return str(folder)


def fp8_dit(folder: Path, tiny_tree: Path) -> str:
    state = torch.load(tiny_tree / COMPONENTS[0] / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    state = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()}
    torch.save({"module": state}, folder / "mp_rank_00_model_states.pt")
    (folder / "dit_config.json").write_bytes((tiny_tree / COMPONENTS[0] / "dit_config.json").read_bytes())
    return "--use-fp8"


LOAD_CASES = {
    "corrupt-vae": ("hunyuan-video-t2v-720p/vae", corrupt_vae, []),
    "pickle-text-encoder": ("text_encoder", pickle_text_encoder, []),
    "fp8-without-use-fp8": ("hunyuan-video-t2v-720p/transformers", fp8_dit, []),
    "missing-load-key": (None, None, ["--load-key", "ema"]),
}


@pytest.mark.parametrize("component,make,extra", LOAD_CASES.values(), ids=LOAD_CASES.keys())
def test_bad_checkpoint_file_is_one_line(tiny_tree, tmp_path, capsys, component, make, extra):
    root, needle = tiny_tree, "--load-key"
    if component is not None:
        root = tree_with(tiny_tree, tmp_path / "ckpts", component)
        needle = make(root / component, tiny_tree)
    out = tmp_path / "out"
    argv = ["--prompt", "x", "--model-base", str(root), "--save-path", str(out), *SMALL, *extra]
    code, err = run_main(argv, capsys)
    assert_clean_failure(code, err, needle, out)


def test_nan_weights_stop_after_the_first_step(tiny_tree, tmp_path, capsys):
    dit_dir = tmp_path / "nan_dit"
    path = write_dit(dit_dir)
    state = torch.load(path, weights_only=True)
    state["module"]["final_layer.linear.weight"][0, 0] = float("nan")
    torch.save(state, path)
    out = tmp_path / "out"
    code, err = run_main(["--prompt", "x", "--model-base", str(tiny_tree), "--dit-weight", str(dit_dir),
                          "--save-path", str(out), "--save-latents", *SMALL], capsys)
    assert_clean_failure(code, err, "not finite", out)
    assert "step 1 of 2" in err


def test_full_disk_removes_the_latents_already_written(tiny_tree, tmp_path, capsys, monkeypatch):
    import hyvideo.runner as runner

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "save_video", no_space)  # the latents file is written before the video
    out = tmp_path / "out"
    code, err = run_main(["--prompt", "x", "--model-base", str(tiny_tree), "--save-path", str(out),
                          "--save-latents", *SMALL], capsys)
    assert_clean_failure(code, err, "No space left on device", out)


# --------------------------------------------------------------------------------------------------
# Memory check
# --------------------------------------------------------------------------------------------------


def test_memory_check_refuses_before_loading(tiny_tree, tmp_path, capsys, monkeypatch):
    import hyvideo.inference as inference
    import hyvideo.lowmem.memory_check as memory_check

    monkeypatch.setattr(memory_check, "describes_released_models", lambda *folders: True)
    monkeypatch.setattr(memory_check, "device_free_bytes", lambda device: 4 << 30)
    monkeypatch.setattr(inference, "load_transformer", lambda *a, **kw: pytest.fail("loaded despite the check"))
    out = tmp_path / "out"
    argv = ["--prompt", "x", "--model-base", str(tiny_tree), "--save-path", str(out),
            "--video-size", "720", "1280", "--video-length", "129"]
    code, err = run_main(argv, capsys)
    assert_clean_failure(code, err, "--no-memory-check", out)
    assert "biggest term: text encoder weights" in err and "--use-cpu-offload" not in err  # CPU: no offload

    def reached_loading(*args, **kwargs):
        raise ValueError("reached loading")

    monkeypatch.setattr(inference, "load_transformer", reached_loading)
    code, err = run_main([*argv, "--no-memory-check"], capsys)
    assert code == 2 and "reached loading" in err


def test_memory_verdict_uses_the_dit_being_loaded(tiny_tree, tmp_path, monkeypatch):
    import hyvideo.lowmem.memory_check as memory_check
    from hyvideo.config import parse_args

    cpu, plenty = torch.device("cpu"), 1 << 40
    tiny = parse_args(["--prompt", "x", "--model-base", str(tiny_tree)])
    assert memory_check.memory_verdict(tiny, device=cpu, available_bytes=plenty) is None  # tiny encoders
    monkeypatch.setattr(memory_check, "describes_released_models", lambda *folders: True)
    full_dit = tmp_path / "full" / "mp_rank_00_model_states.pt"  # no config beside it: the 13B preset
    full_dit.parent.mkdir()
    full_dit.write_bytes(b"")  # never read: the estimate needs only the architecture
    full = parse_args(["--prompt", "x", "--model-base", str(tiny_tree), "--dit-weight", str(full_dit)])
    tiny_verdict = memory_verdict_for(tiny, cpu, plenty)
    full_verdict = memory_verdict_for(full, cpu, plenty)
    assert tiny_verdict.biggest_term == "text encoder weights"  # the tiny DiT's activations are small
    # 13B bf16 weights (24 GiB) outweigh the token-chunked activations (~4 GiB traced at 720p x 129)
    assert full_verdict.biggest_term == "DiT weights"
    assert full_verdict.needed_gib > tiny_verdict.needed_gib
    nowhere = str(tmp_path / "no")
    missing = parse_args(["--prompt", "x", "--model-base", str(tiny_tree), "--dit-weight", nowhere])
    assert memory_verdict_for(missing, cpu, plenty) is None  # loading will report the missing file
    off = parse_args(["--prompt", "x", "--model-base", str(tiny_tree), "--no-memory-check"])
    assert off.runtime.memory_check is False


def test_memory_verdict_on_an_accelerator_suggests_offload(tiny_tree, monkeypatch):
    import hyvideo.lowmem.memory_check as memory_check
    from hyvideo.config import parse_args

    monkeypatch.setattr(memory_check, "describes_released_models", lambda *folders: True)
    configs = parse_args(["--prompt", "x", "--model-base", str(tiny_tree), "--cfg-scale", "2"])
    # "meta" stands in for an accelerator: the available memory is given, so no device is queried.
    verdict = memory_verdict_for(configs, torch.device("meta"), 20 << 30)
    assert not verdict.fits and verdict.biggest_term == "text encoder weights"
    assert verdict.hints[0] == "--use-cpu-offload" and verdict.available_gib == 20
    offloaded = parse_args(["--prompt", "x", "--model-base", str(tiny_tree), "--use-cpu-offload"])
    assert memory_verdict_for(offloaded, torch.device("meta"), 20 << 30).fits  # LLM alone on the card


def memory_verdict_for(configs, device, available):
    from hyvideo.lowmem.memory_check import memory_verdict

    return memory_verdict(configs, device=device, available_bytes=available)


@pytest.mark.gpu
def test_device_free_bytes_on_the_gpu():
    from hyvideo.lowmem.memory_check import device_free_bytes

    free = device_free_bytes(torch.device("cuda", 0))
    assert free is not None and 0 < free <= torch.cuda.get_device_properties(0).total_memory


def test_mem_available_is_read_from_meminfo(tmp_path):
    from hyvideo.lowmem.memory_check import _mem_available_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  1000 kB\nMemFree: 10 kB\nMemAvailable:     2048 kB\n")
    assert _mem_available_bytes(meminfo) == 2048 * 1024
    meminfo.write_text("MemTotal:  1000 kB\n")
    assert _mem_available_bytes(meminfo) is None


# --------------------------------------------------------------------------------------------------
# Outputs: strict JSON, resolved architecture, escaped prompts
# --------------------------------------------------------------------------------------------------


def test_sidecar_is_strict_json(tmp_path):
    from hyvideo.utils.file_utils import write_sidecar

    path = write_sidecar(tmp_path / "v.mp4", {"cfg": float("nan"), "x": [float("inf"), -math.inf, 1.5],
                                              "t": torch.tensor([float("nan"), 2.0])})
    text = path.read_text()
    values = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert values == {"cfg": "NaN", "x": ["Infinity", "-Infinity", 1.5], "t": ["NaN", 2.0]}


def test_sidecar_records_the_built_architecture(tiny_tree, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(["--prompt", "a\x1b[31m red\nball", "--model-base", str(tiny_tree), "--seed", "1",
                          "--save-path", str(out), *SMALL], capsys)
    assert code == 0, err
    (sidecar,) = out.glob("*.json")
    dit = json.loads(sidecar.read_text())["settings"]["model"]["dit"]
    assert dit["hidden_size"] == 64 and dit["mm_double_blocks_depth"] == 2  # the tiny tree's, not the preset


def test_printable_escapes_control_characters():
    from hyvideo.runner import printable

    assert printable("a\x1b[31m red\nball\u202e 猫") == "a\\x1b[31m red\\nball\\u202e 猫"


# --------------------------------------------------------------------------------------------------
# Signals: a real process, signalled by itself at a known point (test-only driver below)
# --------------------------------------------------------------------------------------------------

# Test-only: patches one function of the library in the child process so that it signals itself right
# after the first denoising step ("sampling") or after the first frame went to ffmpeg ("writing").
DRIVER = r"""
import os, signal, sys
import sample_video
from hyvideo.diffusion.pipelines import pipeline_hunyuan_video as pipeline
from hyvideo.utils import file_utils

sig, where = getattr(signal, sys.argv[1]), sys.argv[2]
if where == "sampling":
    check = pipeline.check_finite_latents
    def signalling_check(latents, *, step, steps):
        check(latents, step=step, steps=steps)
        os.kill(os.getpid(), sig)
    pipeline.check_finite_latents = signalling_check
else:
    frames = file_utils._chain_checked
    def signalling_frames(first, rest, *, size):
        for index, frame in enumerate(frames(first, rest, size=size)):
            yield frame
            if index == 0:
                os.kill(os.getpid(), sig)
    file_utils._chain_checked = signalling_frames
sys.exit(sample_video.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where", ["sampling", "writing"])
@pytest.mark.parametrize("sig,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_leaves_no_file(tiny_tree, tmp_path, where, sig, status):
    out = tmp_path / "out"
    argv = [sys.executable, "-c", DRIVER, sig, where, "--prompt", "x", "--model-base", str(tiny_tree),
            "--save-path", str(out), "--save-latents", *SMALL, "--video-length", "5"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sample_video.py: interrupted by") and sig in last
    assert files_in(out) == []  # no video, latents, sidecar or hidden .partial file
