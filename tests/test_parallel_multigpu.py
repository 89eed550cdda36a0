"""CFG-parallel, FSDP2-sharded weights and the automatic layout (issue 16).

Two torchrun launches (2 and 4 CPU processes, gloo) of tests/parallel_workers/multigpu_worker.py cover
CFG-parallel (U1 at 2 processes, U2 at 4), the DiT sharded over 2 and 4 ranks with and without fp8 (forward
and whole pipeline) and both together; references are computed here in one process from the same files.
The layout rule is checked in-process, as a pure function.
"""

from __future__ import annotations

import pytest
import torch

from hyvideo.modules import load_dit
from hyvideo.modules.fp8_optimization import fp8_map_path, load_fp8_dit, quantize_state_dict
from hyvideo.parallel.layout import ParallelLayout, choose_layout
from hyvideo.parallel.weight_sharding import local_weight_bytes
from tests.helpers import rel_err
from tests.parallel_workers import sp_cases as cases
from tests.parallel_workers.launch import REPO, tail, torchrun

WORKER = REPO / "tests" / "parallel_workers" / "multigpu_worker.py"
TOL = 1e-5
FORMATS = ("fp32", "fp8")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The sp_cases DiT as a float32 file and as an fp8 file with its scale map."""
    folder = tmp_path_factory.mktemp("multigpu_ckpt")
    state_dict = cases.build_dit().state_dict()
    torch.save({"module": state_dict}, folder / "dit.pt")
    fp8, scales = quantize_state_dict(state_dict)
    torch.save({"module": fp8}, folder / "dit_fp8.pt")
    torch.save(scales, fp8_map_path(folder / "dit_fp8.pt"))
    return folder


@pytest.fixture(scope="module")
def worker(tmp_path_factory, checkpoints):
    cache: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"multigpu{world}") / "results.pt"
            proc, _ = torchrun(world, WORKER, str(out), str(checkpoints))
            if proc.returncode != 0 or not out.exists():
                pytest.fail(f"worker failed:\n{tail(proc)}")
            cache[world] = torch.load(out, weights_only=True)
        return cache[world]

    return get


@pytest.fixture(scope="module")
def reference(checkpoints):
    """Single-process outputs of the same cases, loaded unsharded from the same files."""
    vae = cases.build_vae()
    ref = {}
    out = cases.run_pipeline(cases.build_pipeline(cases.build_dit(), vae))
    ref["cfg/latents"], ref["cfg/video"] = out.latents, out.videos
    for fmt in FORMATS:
        if fmt == "fp8":
            dit = load_fp8_dit(cases.DIT4, checkpoints / "dit_fp8.pt", dtype=torch.float32,
                               attention_backend="sdpa")
        else:
            dit = load_dit(cases.DIT4, checkpoints / "dit.pt", dtype=torch.float32, attention_backend="sdpa")
        ref[f"{fmt}/bytes"] = local_weight_bytes(dit)
        ref[f"{fmt}/buffer_bytes"] = sum(b.numel() * b.element_size() for b in dit.buffers())
        with torch.no_grad():
            for name in cases.DIT_CASES:
                ref[f"shard/{fmt}/dit/{name}"] = dit(**cases.dit_inputs(name))
        out = cases.run_pipeline(cases.build_pipeline(dit, vae), output_type="latent")
        ref[f"shard/{fmt}/pipe/latents"] = out.latents
    ref["cfg_shard/fp8/pipe/latents"] = ref["shard/fp8/pipe/latents"]
    return ref


def _check(results: dict, reference: dict, key: str) -> None:
    assert results["ranks_equal"][key], f"ranks returned different {key}"
    assert rel_err(results["outputs"][key], reference[key]) <= TOL, key


@pytest.mark.multigpu
@pytest.mark.parametrize("world,ulysses", [(2, 1), (4, 2)])
def test_cfg_parallel_equals_single_process_cfg(worker, reference, world, ulysses):
    results = worker(world)
    for part in ("latents", "video") if world == 2 else ("latents",):  # decoding at 4 ranks: slow, no news
        _check(results, reference, f"cfg/{part}")
    half = world // 2
    assert results["facts"]["cfg/branch"] == [0] * half + [1] * half  # negative half, then positive half
    assert [tuple(x) for x in results["facts"]["cfg/layout"]] == [(ulysses, half // ulysses)] * world


@pytest.mark.multigpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_weights_equal_single_process(worker, reference, world, fmt):
    results = worker(world)
    for name in cases.DIT_CASES:
        _check(results, reference, f"shard/{fmt}/dit/{name}")
    _check(results, reference, f"shard/{fmt}/pipe/latents")
    # Each rank holds its 1/N of every parameter (all ranks together exactly the model) and every buffer
    # (the fp8 scales are not sharded).
    local = results["facts"][f"shard/{fmt}/local_bytes"]
    full, buffers = reference[f"{fmt}/bytes"], reference[f"{fmt}/buffer_bytes"]
    assert sum(local) == full + (world - 1) * buffers
    assert max(local) <= 1.2 * (full - buffers) / world + buffers, (local, full)


@pytest.mark.multigpu
@pytest.mark.parametrize("world", [2, 4])
def test_cfg_parallel_with_sharded_fp8_weights(worker, reference, world):
    results = worker(world)
    _check(results, reference, "cfg_shard/fp8/pipe/latents")
    assert max(results["facts"]["cfg_shard/fp8/local_bytes"]) < reference["fp8/bytes"] / world * 1.2


# --------------------------------------------------------------------------------------------------
# The layout rule (pure)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world,heads,per_node,cfg,expected",
    [
        # 4 heads: Ulysses takes what divides both the world and the heads, the ring the rest
        (2, 4, None, False, (2, 1, 1)),
        (3, 4, None, False, (1, 3, 1)),  # 3 does not divide 4 heads: all ring
        (4, 4, None, False, (4, 1, 1)),
        (6, 4, None, False, (2, 3, 1)),  # 6 = Ulysses 2 (divides 4) x ring 3
        # 6 heads: 3 and 6 go fully to Ulysses, 4 only half
        (3, 6, None, False, (3, 1, 1)),
        (4, 6, None, False, (2, 2, 1)),
        (6, 6, None, False, (6, 1, 1)),
        # HunyuanVideo's 24 heads: 5, 7, 10 GPUs get ring attention for what Ulysses cannot take
        (5, 24, None, False, (1, 5, 1)),
        (8, 24, None, False, (8, 1, 1)),
        (10, 24, None, False, (2, 5, 1)),
        # Ulysses stays inside a node: 2 nodes x 4 ranks -> Ulysses 4, ring 2 across the nodes
        (8, 24, 4, False, (4, 2, 1)),
        (4, 2, 2, False, (2, 2, 1)),
        # --cfg-parallel halves the world first
        (2, 4, None, True, (1, 1, 2)),
        (4, 4, None, True, (2, 1, 2)),
        (12, 24, None, True, (6, 1, 2)),
        (8, 24, 2, True, (2, 2, 2)),
    ],
)
def test_automatic_layout_rule(world, heads, per_node, cfg, expected):
    layout = choose_layout(world, heads, ranks_per_node=per_node, cfg_parallel=cfg)
    assert (layout.ulysses_degree, layout.ring_degree, layout.cfg_degree) == expected
    assert layout.world_size == world and heads % layout.ulysses_degree == 0
    assert "automatic" in layout.describe()


def test_cfg_parallel_needs_an_even_world():
    with pytest.raises(ValueError, match="even number"):
        choose_layout(3, 24, cfg_parallel=True)
    assert ParallelLayout(2, 3, 2).world_size == 12
