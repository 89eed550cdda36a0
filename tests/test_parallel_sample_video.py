"""sample_video.py under torchrun (CPU, gloo): one output, equal to the single-process run; clean failures.

Launches: one 2-process CFG-parallel sampling run (no --seed), one two-"node" run (2 launchers x 2 processes,
c10d rendezvous, automatic layout, sharded weights), one bad layout, one injected rank failure. Checks
that every rank decides identically before any collective run in-process with torchrun's environment
variables set by hand, since they need no process group.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

import sample_video
from hyvideo import config
from hyvideo.constants import DiTConfig
from hyvideo.testing.tiny import write_tiny_checkpoints
from hyvideo.utils.file_utils import load_latents
from tests.helpers import rel_err
from tests.parallel_workers.launch import REPO, tail, torchrun, torchrun_nodes

SMALL = ["--video-size", "64", "96", "--video-length", "5", "--infer-steps", "2", "--precision", "fp32",
         "--vae-precision", "fp32", "--text-encoder-precision", "fp32", "--text-encoder-precision-2", "fp32"]
PROMPT = "A cat walks on the grass, realistic style."
TORCHRUN_4 = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


def _launch_env(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def _files(folder: Path) -> list[str]:
    return sorted(p.suffix for p in folder.iterdir()) if folder.exists() else []


def _single_process(tiny_tree, folder: Path, seed: int, *extra: str) -> tuple[torch.Tensor, Path]:
    code = sample_video.main(["--model-base", str(tiny_tree), "--prompt", PROMPT, "--seed", str(seed),
                              "--save-path", str(folder), "--save-latents", *SMALL, *extra])
    assert code == 0
    (latents,) = folder.glob("*.safetensors")
    return load_latents(latents)[0], latents.with_suffix(".mp4")


def _one_output(folder: Path) -> tuple[Path, dict, torch.Tensor]:
    """The only video in `folder` (with its sidecar and latents: only global rank 0 writes)."""
    assert _files(folder) == [".json", ".mp4", ".safetensors"], "expected one video + sidecar + latents"
    (video,) = folder.glob("*.mp4")
    sidecar = json.loads(video.with_suffix(".json").read_text())
    return video, sidecar, load_latents(video.with_suffix(".safetensors"))[0]


@pytest.mark.multigpu
def test_torchrun_cfg_parallel_writes_one_video_equal_to_single_process(tiny_tree, tmp_path):
    out = tmp_path / "parallel"
    argv = ["--model-base", str(tiny_tree), "--prompt", PROMPT, "--save-path", str(out), "--save-latents",
            "--cfg-scale", "2.5", "--cfg-parallel", "--ulysses-degree", "1", *SMALL]
    proc, _ = torchrun(2, REPO / "sample_video.py", *argv)
    assert proc.returncode == 0, tail(proc)
    video, sidecar, parallel = _one_output(out)
    seed = sidecar["seed"]  # drawn on rank 0 (no --seed) and used by both ranks
    assert f"_seed{seed}_" in video.name and sidecar["settings"]["runtime"]["world_size"] == 2
    assert sidecar["settings"]["runtime"]["cfg_parallel"] is True
    logs = proc.stdout + proc.stderr
    assert "[rank 0] INFO" in logs and "[rank 1] INFO" not in logs  # only the main process logs INFO
    # The same seed in one process, both branches in one batch, gives the same latents.
    single, _ = _single_process(tiny_tree, tmp_path / "single", seed, "--cfg-scale", "2.5")
    assert rel_err(parallel, single) <= 1e-5


@pytest.mark.multigpu
def test_two_node_rendezvous_writes_one_video_equal_to_single_process(tiny_tree, tmp_path):
    """Two torchrun launchers (2 "nodes" x 2 processes) meet via c10d; no degree given, sharded weights."""
    out = tmp_path / "nodes"
    argv = ["--model-base", str(tiny_tree), "--prompt", PROMPT, "--save-path", str(out), "--save-latents",
            "--shard-weights", *SMALL]
    nodes, seconds = torchrun_nodes(2, 2, REPO / "sample_video.py", *argv)
    for node in nodes:
        assert node.returncode == 0, tail(node)
    logs = "".join(node.stdout + node.stderr for node in nodes)
    # 4 processes, 2 per node, 2 heads: Ulysses 2 inside each node, ring 2 across the nodes; logged once.
    assert logs.count("ulysses 2 x ring 2 (automatic") == 1, logs[-3000:]
    assert "sharded over 4 rank(s)" in logs
    video, sidecar, parallel = _one_output(out)
    runtime = sidecar["settings"]["runtime"]
    assert (runtime["world_size"], runtime["ulysses_degree"], runtime["ring_degree"]) == (4, 2, 2)
    single, single_video = _single_process(tiny_tree, tmp_path / "single", sidecar["seed"])
    assert rel_err(parallel, single) <= 1e-5
    frames, single_frames = (iio.imread(v, plugin="FFMPEG").astype(int) for v in (video, single_video))
    # Latents within 1e-5 may round a pixel to the neighbouring 8-bit level, nothing more.
    assert frames.shape == single_frames.shape and abs(frames - single_frames).max() <= 1
    assert seconds < 240


@pytest.mark.multigpu
def test_bad_layout_exits_every_rank_with_one_message(tiny_tree, tmp_path):
    out = tmp_path / "never"
    proc, seconds = torchrun(2, REPO / "sample_video.py", "--model-base", str(tiny_tree), "--prompt", "x",
                             "--save-path", str(out), "--ulysses-degree", "4", *SMALL)
    logs = proc.stdout + proc.stderr
    message = "--ulysses-degree 4 x --ring-degree 1 = 4, but torchrun launched 2 processes"
    assert proc.returncode != 0 and logs.count(message) == 1, tail(proc)
    # Every rank exits with status 2 (a rank still exiting when torchrun sees the first may be reported as
    # stopped by torchrun's SIGTERM instead); none crashes or waits.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", logs)
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes
    assert not out.exists() and seconds < 60


@pytest.mark.multigpu
def test_one_failing_rank_ends_every_rank(tmp_path):
    proc, seconds = torchrun(2, REPO / "tests" / "parallel_workers" / "failure_worker.py")
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "injected failure on rank 1" in logs, tail(proc)
    assert "PASSED THE COLLECTIVE" not in logs
    assert seconds < 60, f"took {seconds:.0f} s: a rank waited for the failed one"


# --------------------------------------------------------------------------------------------------
# In-process: torchrun's environment set by hand (no process group is needed before these errors)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1])
def test_ulysses_degree_not_dividing_heads_fails_before_any_collective(tmp_path, monkeypatch, capsys, rank):
    folder = tmp_path / "dit"
    folder.mkdir()
    three_heads = DiTConfig(hidden_size=48, heads_num=3, rope_dim_list=(4, 6, 6))
    (folder / "dit_config.json").write_text(json.dumps(three_heads.to_dict()))
    (folder / "weights.pt").write_bytes(b"")  # never read: the check comes first
    _launch_env(monkeypatch, rank, 2)
    code = sample_video.main(["--model-base", str(tmp_path), "--dit-weight", str(folder / "weights.pt"),
                              "--prompt", "x", "--save-path", str(tmp_path / "out"), "--ulysses-degree", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    if rank == 0:
        assert len(err.splitlines()) == 1 and "number of attention heads (3)" in err, err
        assert "--ulysses-degree 2" in err
    else:
        assert err == "", "only local rank 0 reports an error every rank detects"


@pytest.mark.parametrize(
    "env,argv,needle",
    [
        ({}, ["--ulysses-degree", "2"], "needs 2 processes: launch with torchrun --nproc_per_node=2"),
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}, ["--ring-degree", "2"],
         "= 2, but torchrun launched 4 processes"),
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, ["--ulysses-degree", "1"],
         "= 1, but torchrun launched 2 processes"),
        (TORCHRUN_4, ["--cfg-parallel", "--cfg-scale", "2", "--ring-degree", "4"],
         "x 2 (--cfg-parallel) = 8, but torchrun launched 4 processes: choose degrees whose product is 2"),
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3"}, ["--cfg-parallel", "--cfg-scale", "2"],
         "launch an even number of them"),
        ({}, ["--cfg-parallel", "--cfg-scale", "2"], "launch an even number of them"),
        (TORCHRUN_4, ["--cfg-parallel"], "but --cfg-scale 1 runs only one: add --cfg-scale > 1"),
        ({}, ["--shard-weights"], "one process has nothing to share it with"),
        (TORCHRUN_4, ["--shard-weights", "--use-cpu-offload"], "use --offload-mode model"),
        (TORCHRUN_4, ["--shard-weights", "--compile"], "--shard-weights has not been tested with --compile"),
        (TORCHRUN_4, ["--cfg-parallel", "--cfg-scale", "2", "--cache", "teacache"],
         "halves would skip different steps: use --cache magcache"),
    ],
    ids=["no-torchrun", "product-too-small", "explicit-1-still-checked", "cfg-product", "cfg-odd-world",
         "cfg-one-process", "cfg-without-cfg-scale", "shard-one-process", "shard-with-block-offload", "shard-with-compile",
         "cfg-with-value-decided-cache"],
)
def test_layout_checked_against_world_size(monkeypatch, capsys, env, argv, needle):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        config.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_runtime_carries_the_launch(monkeypatch, capsys):
    _launch_env(monkeypatch, 3, 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    runtime = config.parse_args(["--ulysses-degree", "2", "--ring-degree", "2"]).runtime
    assert (runtime.rank, runtime.world_size, runtime.local_rank) == (3, 4, 1)
    assert not runtime.is_main_process and runtime.sequence_parallel_degree == 4
    _launch_env(monkeypatch, 1, 2)  # a non-reporting rank exits 2 without printing
    with pytest.raises(SystemExit) as exc:
        config.parse_args(["--ulysses-degree", "4"])
    assert exc.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SystemExit):
        config.parse_args([])
    assert "WORLD_SIZE='two' is not an integer" in capsys.readouterr().err


def test_no_degree_is_chosen_at_launch_and_one_process_records_1x1(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    single = config.parse_args([]).runtime
    assert (single.ulysses_degree, single.ring_degree, single.auto_layout) == (1, 1, False)
    for name, value in TORCHRUN_4.items():
        monkeypatch.setenv(name, value)
    runtime = config.parse_args(["--cfg-parallel", "--cfg-scale", "3", "--shard-weights"]).runtime
    assert runtime.auto_layout and runtime.sequence_parallel_degree == 2
    assert (runtime.cfg_parallel, runtime.shard_weights, runtime.local_world_size) == (True, True, 2)
