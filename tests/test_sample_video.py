"""End to end: sample_video.py on the tiny checkpoint tree writes mp4 + sidecar; bad inputs fail cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

import sample_video
from hyvideo.testing.tiny import write_tiny_checkpoints
from hyvideo.utils.file_utils import load_latents

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--video-size", "64", "96", "--video-length", "5", "--infer-steps", "2", "--precision", "fp32",
         "--vae-precision", "fp32", "--text-encoder-precision", "fp32", "--text-encoder-precision-2", "fp32"]


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = sample_video.main(argv)
    return code, capsys.readouterr().err


def outputs(folder: Path, suffix: str) -> list[Path]:
    return sorted(folder.glob(f"*{suffix}")) if folder.exists() else []


def test_cli_writes_video_and_sidecar(tiny_tree, tmp_path):
    out = tmp_path / "results"
    argv = [sys.executable, "sample_video.py", "--model-base", str(tiny_tree), "--prompt",
            "A cat walks on the grass, realistic style.", "--seed", "42", "--save-path", str(out),
            "--save-latents", *SMALL]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (video,) = outputs(out, ".mp4")
    frames = iio.imread(video)
    assert frames.shape == (5, 64, 96, 3)
    assert "_seed42_A cat walks on the grass, realistic style" in video.name
    sidecar = json.loads(video.with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["seed"] == 42 and sidecar["prompt"].startswith("A cat")
    assert sidecar["size"] == [64, 96, 5] and sidecar["settings"]["sampling"]["infer_steps"] == 2
    assert {"torch", "transformers", "diffusers"} <= set(sidecar["versions"])
    latents, meta = load_latents(video.with_suffix(".safetensors"))
    assert latents.shape == (1, 16, 2, 8, 12) and meta["seed"] == 42


def test_same_seed_same_video_and_num_videos(tiny_tree, tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        code, err = run(["--model-base", str(tiny_tree), "--prompt", "a red ball", "--seed", "3",
                         "--num-videos", "2", "--save-path", str(out), "--save-latents", *SMALL], capsys)
        assert code == 0, err
        runs.append(outputs(out, ".safetensors"))
    assert len(runs[0]) == 2
    first, second = ([load_latents(p)[0] for p in r] for r in runs)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(first, second))
    assert not np.array_equal(first[0].numpy(), first[1].numpy())  # seeds 3 and 4 differ
    seeds = sorted(json.loads(p.with_suffix(".json").read_text())["seed"] for p in runs[0])
    assert seeds == [3, 4]


def test_prompt_file_loads_models_once(tiny_tree, tmp_path, capsys, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\na cat / with a slash\n\nthird prompt\n", encoding="utf-8")
    out = tmp_path / "many"
    with caplog.at_level("INFO"):
        code, err = run(["--model-base", str(tiny_tree), "--prompt-file", str(prompts), "--seed", "1",
                         "--save-path", str(out), *SMALL], capsys)
    assert code == 0, err
    assert caplog.text.count("Models loaded") == 1
    videos = outputs(out, ".mp4")
    assert len(videos) == 3 and all("/" not in v.name for v in videos)


def test_random_seed_is_recorded(tiny_tree, tmp_path, capsys):
    out = tmp_path / "r"
    code, err = run(["--model-base", str(tiny_tree), "--prompt", "x", "--save-path", str(out), *SMALL], capsys)
    assert code == 0, err
    (video,) = outputs(out, ".mp4")
    seed = json.loads(video.with_suffix(".json").read_text())["seed"]
    assert isinstance(seed, int) and f"_seed{seed}_" in video.name


def test_decode_saved_latents(tiny_tree, tmp_path, capsys):
    out = tmp_path / "d"
    code, err = run(["--model-base", str(tiny_tree), "--prompt", "x", "--seed", "5", "--save-latents",
                     "--save-path", str(out), *SMALL], capsys)
    assert code == 0, err
    (latent_file,) = outputs(out, ".safetensors")
    code, err = run(["--model-base", str(tiny_tree), "--decode-latents", str(latent_file),
                     "--save-path", str(out), *SMALL], capsys)
    assert code == 0, err
    (original,) = (v for v in outputs(out, ".mp4") if "_decoded" not in v.name)
    (decoded,) = (v for v in outputs(out, ".mp4") if "_decoded" in v.name)
    np.testing.assert_array_equal(iio.imread(original), iio.imread(decoded))


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--model-base", "/nonexistent/ckpts", "--prompt", "x"], "/nonexistent/ckpts"),
        (["--prompt", "x", "--video-length", "6"], "--video-length"),
        (["--prompt", "x", "--video-size", "0", "64"], "--video-size"),
        (["--prompt", "x", "--video-size", "-64"], "--video-size"),
    ],
    ids=["missing-ckpts", "frame-count", "zero-size", "negative-size"],
)
def test_bad_inputs_one_line_nothing_written(tiny_tree, tmp_path, capsys, extra, needle):
    out = tmp_path / "never"
    argv = [*SMALL, "--model-base", str(tiny_tree), "--save-path", str(out), *extra]
    try:
        code, err = run(argv, capsys)
    except SystemExit as exc:  # flag validation exits from argparse
        code, err = exc.code, capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert not outputs(out, ".mp4")


def test_unwritable_save_path(tiny_tree, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = run(["--model-base", str(tiny_tree), "--prompt", "x", "--save-path", str(blocker / "sub"),
                     *SMALL], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "a_file" in err


def test_empty_prompt_file(tiny_tree, tmp_path, capsys):
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n  \n# only a comment\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        sample_video.main(["--model-base", str(tiny_tree), "--prompt-file", str(prompts),
                           "--save-path", str(tmp_path / "o"), *SMALL])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "--prompt-file" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["model", "block", "sequential"])
def test_offload_modes_give_the_resident_latents(tiny_tree, tmp_path, capsys, mode):
    latents = []
    for name, extra in (("resident", []), (mode, ["--use-cpu-offload", "--offload-mode", mode])):
        out = tmp_path / name
        code, err = run(["--model-base", str(tiny_tree), "--prompt", "a boat", "--seed", "11", "--save-latents",
                         "--save-path", str(out), *SMALL, *extra], capsys)
        assert code == 0, err
        (path,) = outputs(out, ".safetensors")
        latents.append(load_latents(path)[0])
    assert np.array_equal(latents[0].numpy(), latents[1].numpy())


def test_plan_memory_prints_and_loads_nothing(tmp_path, capsys):
    code = sample_video.main(["--plan-memory", "24", "--video-size", "544", "960", "--use-cpu-offload",
                              "--use-fp8", "--model-base", str(tmp_path / "no-weights-needed")])
    out = capsys.readouterr().out
    assert code == 0 and "544x960" in out and "block" in out and "fits" in out
