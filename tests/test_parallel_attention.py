"""Sequence-parallel core (hyvideo.parallel): in-process checks plus torchrun launches on CPU with gloo.

The multi-process checks run in tests/parallel_workers/attention_worker.py, once with 2 and once with 4
processes; each launch covers every U x R layout of its world size and writes its metrics to a JSON file that
the tests below read (one torchrun start-up per world size keeps the file fast).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hyvideo.parallel import (
    SequenceParallelConfig,
    SequenceParallelState,
    attention_with_lse,
    broadcast_seed,
    check_num_heads,
    gather_tokens,
    init_sequence_parallel,
    merge_partials,
    sequence_parallel_attention,
    shard_tokens,
    single_process_state,
    token_shard,
)
from hyvideo.parallel.attention import _math_attention
from tests.helpers import rel_err

REPO = Path(__file__).resolve().parents[1]
WORKERS = REPO / "tests" / "parallel_workers"
LAUNCH_TIMEOUT_S = 240
FP32_TOL, BF16_TOL = 1e-5, 2e-2
LAYOUTS = {2: ("u1r2", "u2r1"), 4: ("u1r4", "u2r2", "u4r1")}
CASES = ("pad", "odd", "tiny", "notext", "bf16")


# --------------------------------------------------------------------------------------------------
# torchrun launches
# --------------------------------------------------------------------------------------------------


def _torchrun(nproc: int, script: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run `script` under torchrun with `nproc` CPU processes; return the finished process and seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    start = time.monotonic()
    proc = subprocess.run(
        [*cmd, str(script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    """world size -> the attention worker's metrics (each world size is launched once, on first use)."""
    cache: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"sp{world}") / "results.json"
            proc, _ = _torchrun(world, WORKERS / "attention_worker.py", str(out), str(world))
            if proc.returncode != 0 or not out.exists():
                tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
                pytest.fail(f"attention worker failed (rc={proc.returncode}):\n{tail}")
            cache[world] = json.loads(out.read_text())
        return cache[world]

    return get


@pytest.mark.multigpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world,layout", [(w, lay) for w, lays in LAYOUTS.items() for lay in lays])
def test_parallel_attention_matches_single_process(worker_results, world, layout, case):
    metrics = worker_results(world)[f"{layout}/{case}"]
    tol = BF16_TOL if case == "bf16" else FP32_TOL
    assert metrics["rel_img"] <= tol, metrics
    assert metrics["rel_txt"] <= tol, metrics
    assert metrics["txt_identical"], "text outputs differ between ranks"
    assert metrics["finite"], "non-finite attention output (padded rows included)"
    assert metrics["dtype_ok"], "wrong output dtype or shape"


@pytest.mark.multigpu
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_shard_gather_seed_and_layout_checks(worker_results, world):
    results = worker_results(world)
    assert results["shard_gather"] == {"exact": True, "shapes_ok": True}
    assert results["seed"]["same_drawn"], "broadcast_seed(None) gave different seeds on different ranks"
    assert results["seed"]["given"] == [100], "broadcast_seed did not take rank 0's seed everywhere"
    assert results["bad_layout"] == {"mismatch_raised": True, "heads_raised": True}


@pytest.mark.multigpu
def test_bad_layout_exits_with_clear_error():
    proc, seconds = _torchrun(2, WORKERS / "bad_layout_worker.py")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "BAD LAYOUT ACCEPTED" not in output
    expected = "ulysses_degree (4) x ring_degree (1) = 4, but 2 process(es) were launched"
    assert expected in output, output[-4000:]
    assert seconds < 60, f"took {seconds:.0f} s: a rank waited instead of failing"


# --------------------------------------------------------------------------------------------------
# In-process (single rank)
# --------------------------------------------------------------------------------------------------


def _placed_state(rank: int, world: int) -> SequenceParallelState:
    """A state at `rank` of `world` without any process group (for the pure layout arithmetic)."""
    return SequenceParallelState(SequenceParallelConfig(world, 1), rank, world, torch.device("cpu"))


def _joint_inputs(batch=2, l_img=30, l_txt=8, heads=4, dim=16, txt_lens=(5, 8)):
    q, k, v = (torch.randn(batch, l_img + l_txt, heads, dim) for _ in range(3))
    txt_mask = torch.arange(l_txt)[None, :] < torch.tensor(txt_lens)[:, None]  # (B, L_txt)
    return q, k, v, txt_mask


def _sdpa_reference(q, k, v, key_mask):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask[:, None, None, :]
    )
    return out.transpose(1, 2).flatten(2)


def test_single_process_attention_matches_sdpa_with_image_padding():
    q, k, v, txt_mask = _joint_inputs(txt_lens=(0, 6))
    l_img, valid = 30, 27  # the last 3 image tokens play padding
    state = single_process_state()
    out = sequence_parallel_attention(
        q, k, v, num_img_tokens=l_img, img_valid_len=valid, txt_key_mask=txt_mask, state=state
    )
    key_mask = torch.cat([(torch.arange(l_img) < valid).expand(2, l_img), txt_mask], dim=1)
    assert rel_err(out, _sdpa_reference(q, k, v, key_mask)) <= FP32_TOL


def test_math_fallback_matches_cpu_flash_kernel_and_handles_empty_rows():
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    key_mask = torch.tensor([[True] * 4 + [False] * 5, [False] * 9])  # sample 1 has no valid key
    out_f, lse_f = attention_with_lse(q, k, v, key_mask=key_mask)
    out_m, lse_m = _math_attention(q, k, v, key_mask, 16**-0.5)
    assert rel_err(out_f[0], out_m[0]) <= FP32_TOL and rel_err(lse_f[0], lse_m[0]) <= FP32_TOL
    assert torch.equal(out_f[1], torch.zeros_like(out_f[1])) and bool((lse_f[1] == float("-inf")).all())
    assert rel_err(lse_f[0], torch.logsumexp((q[0] @ k[0, :, :4].mT) / 4.0, dim=-1)) <= FP32_TOL


def test_merge_partials_is_exact_and_nan_free():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    part_a = attention_with_lse(q, k[:, :, :2], v[:, :, :2])
    part_b = attention_with_lse(q, k[:, :, 2:], v[:, :, 2:])
    out, _ = merge_partials(part_a, part_b)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) <= FP32_TOL
    # Two partials without any valid key (what attention_with_lse returns for them: out 0, lse -inf).
    empty = (torch.zeros(1, 2, 5, 8), torch.full((1, 2, 5), float("-inf")))
    out_e, lse_e = merge_partials(empty, empty)
    assert torch.equal(out_e, empty[0]) and bool((lse_e == float("-inf")).all())
    out_m, lse_m = merge_partials(part_a, empty)  # an empty partial changes nothing
    assert torch.equal(out_m, part_a[0]) and torch.equal(lse_m, part_a[1])


def test_layout_validation_messages():
    with pytest.raises(ValueError, match=r"does not divide the number of attention heads \(24\)"):
        check_num_heads(24, 5)
    check_num_heads(24, 8)
    with pytest.raises(ValueError, match=r"ulysses_degree \(2\) x ring_degree \(2\) = 4, but 2 process"):
        init_sequence_parallel(2, 2, world_size=2)
    with pytest.raises(ValueError, match="ring_degree must be a positive integer"):
        SequenceParallelConfig(2, 0)


def test_single_process_helpers():
    state = init_sequence_parallel(1, 1)
    assert not state.enabled and state.is_main and state.device.type == "cpu"
    assert broadcast_seed(42, state) == 42 and isinstance(broadcast_seed(None, state), int)
    x = torch.randn(2, 7, 3)
    chunk, pad = shard_tokens(x, 1, state)
    assert pad == 0 and torch.equal(gather_tokens(chunk, 1, state, 7), x)
    shard = token_shard(30, _placed_state(rank=3, world=4))
    assert (shard.local_len, shard.pad, shard.start, shard.local_valid_len) == (8, 2, 24, 6)
    assert shard.valid_mask().tolist() == [True] * 6 + [False] * 2


def test_attention_rejects_fp8_and_bad_shapes():
    q, k, v, txt_mask = _joint_inputs()
    state = single_process_state()
    with pytest.raises(ValueError, match="upcast fp8"):
        fp8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
        sequence_parallel_attention(*fp8, num_img_tokens=30, state=state)
    with pytest.raises(ValueError, match="txt_key_mask must be"):
        sequence_parallel_attention(q, k, v, num_img_tokens=30, txt_key_mask=txt_mask[:, :4], state=state)
