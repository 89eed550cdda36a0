"""Sequence-parallel DiT, pipeline and VAE decode under torchrun (CPU, gloo) equal the single-process results.

One torchrun launch with 2 processes covers Ulysses 2 and ring 2; one with 4 covers Ulysses 2 x ring 2 and
Ulysses 4. The worker (tests/parallel_workers/dit_pipeline_worker.py) saves rank 0's outputs and per-rank facts;
the references are computed here, in one process, from the same seeds (tests/parallel_workers/sp_cases.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from hyvideo.parallel import ImageTokenSplit, SequenceParallelAttention, single_process_state
from hyvideo.parallel.vae_decode import _region_volume, assign_tiles, parallel_vae_decode
from tests.helpers import rel_err
from tests.parallel_workers import sp_cases as cases
from tests.parallel_workers.launch import REPO, tail, torchrun

WORKER = REPO / "tests" / "parallel_workers" / "dit_pipeline_worker.py"
TOL = 1e-5
LAYOUTS = {2: ("2x1", "1x2"), 4: ("2x2", "4x1")}
PARAMS = [(world, layout) for world, layouts in LAYOUTS.items() for layout in layouts]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """world size -> the worker's saved results (each world size is launched once, on first use)."""
    cache: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"sp{world}") / "results.pt"
            proc, _ = torchrun(world, WORKER, str(out), *LAYOUTS[world])
            if proc.returncode != 0 or not out.exists():
                pytest.fail(f"worker failed:\n{tail(proc)}")
            cache[world] = torch.load(out, weights_only=True)
        return cache[world]

    return get


@pytest.fixture(scope="module")
def reference():
    """Single-process outputs, keyed like the worker's without the layout prefix."""
    dit, vae = cases.build_dit(), cases.build_vae()
    ref = {}
    with torch.no_grad():
        for name in cases.DIT_CASES:
            ref[f"dit/{name}"] = dit(**cases.dit_inputs(name))
        for name in cases.VAE_CASES:
            cases.set_vae_tiling(vae, name)
            ref[f"vae/{name}"] = vae.decode(cases.vae_latents(name))
            ref[f"vae/{name}/num_tiles"] = len(vae.plan_decode_tiles(cases.VAE_CASES[name][0]).tiles)
    out = cases.run_pipeline(cases.build_pipeline(dit, vae))
    ref["pipe/latents"], ref["pipe/video"] = out.latents, out.videos
    return ref


def _image_tokens(latent_shape: tuple[int, ...]) -> int:
    _, _, t, h, w = latent_shape
    return t * (h // 2) * (w // 2)


@pytest.mark.multigpu
@pytest.mark.parametrize("case", list(cases.DIT_CASES))
@pytest.mark.parametrize("world,layout", PARAMS)
def test_dit_matches_single_process(worker, reference, world, layout, case):
    results = worker(world)
    key = f"{layout}/dit/{case}"
    assert results["ranks_equal"][key], "ranks returned different DiT outputs"
    assert rel_err(results["outputs"][key], reference[f"dit/{case}"]) <= TOL
    # The final layer saw only this rank's (padded) share of the image tokens: the forward really split.
    local = math.ceil(_image_tokens(cases.DIT_CASES[case][0]) / world)
    assert results["facts"][f"{key}/final_layer_tokens"] == [local] * world


@pytest.mark.multigpu
@pytest.mark.parametrize("world,layout", PARAMS)
def test_chunked_dit_matches_single_process(worker, reference, world, layout):
    # Chunks of 4 tokens over each rank's 12-23 image tokens (hyvideo/lowmem/chunking.py).
    key = f"{layout}/dit/odd_mixed_text/chunked"
    results = worker(world)
    assert results["ranks_equal"][key], "ranks returned different DiT outputs"
    assert rel_err(results["outputs"][key], reference["dit/odd_mixed_text"]) <= TOL


@pytest.mark.multigpu
@pytest.mark.parametrize("case", list(cases.VAE_CASES))
@pytest.mark.parametrize("world,layout", PARAMS)
def test_vae_decode_matches_single_process_tiled_decode(worker, reference, world, layout, case):
    results = worker(world)
    key = f"{layout}/vae/{case}"
    assert results["ranks_equal"][key], "ranks returned different videos"
    assert rel_err(results["outputs"][key], reference[f"vae/{case}"]) <= TOL
    per_rank = results["facts"][f"{key}/tiles"]
    num_tiles = reference[f"vae/{case}/num_tiles"]
    if num_tiles == 1:  # tiling off: every rank decodes the whole latent
        assert per_rank == [[0]] * world
    else:  # each tile decoded by exactly one rank, and no rank decoded them all
        assert sorted(i for tiles in per_rank for i in tiles) == list(range(num_tiles))
        assert max(len(tiles) for tiles in per_rank) < num_tiles


@pytest.mark.multigpu
@pytest.mark.parametrize("world,layout", PARAMS)
def test_pipeline_video_matches_single_process(worker, reference, world, layout):
    results = worker(world)
    for part in ("latents", "video"):
        key = f"{layout}/pipe/{part}"
        assert results["ranks_equal"][key], f"ranks returned different {part}"
        assert rel_err(results["outputs"][key], reference[f"pipe/{part}"]) <= TOL, part
    assert results["ranks_equal"][f"{layout}/seed"], "ranks did not agree on a drawn seed"


# --------------------------------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------------------------------


def test_single_process_split_is_the_identity():
    split = ImageTokenSplit.create(single_process_state(), 45, "sdpa")
    img, freqs = torch.randn(2, 45, 8), (torch.randn(45, 4), torch.randn(45, 4))
    assert split.backend == "sdpa"
    assert split.scatter(img, freqs)[0] is img and split.gather(img) is img
    dit = cases.build_dit()
    dit.enable_sequence_parallel(single_process_state())
    assert dit.parallel is None  # one process: nothing to split


def test_parallel_attention_rejects_full_masks():
    attn = SequenceParallelAttention(single_process_state(), num_img_tokens=4, img_valid_len=4)
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match=r"\(B, 1, 1, L\) key mask"):
        attn(q, q, q, torch.ones(1, 1, 6, 6, dtype=torch.bool))


def test_tile_assignment_is_balanced_and_complete():
    vae = cases.build_vae()
    shape = (33, 90, 160)  # 720p, 129 frames, with these small tiles: 10 x 30 x 53 tiles
    plan = vae.plan_decode_tiles((1, 16, *shape))
    owners = assign_tiles(plan, shape, 8)
    assert owners == assign_tiles(plan, shape, 8) and set(owners) == set(range(8))
    volumes = [_region_volume(tile.region, shape) for tile in plan.tiles]
    loads = [sum(v for v, o in zip(volumes, owners) if o == rank) for rank in range(8)]
    assert max(loads) <= sum(volumes) / 8 + max(volumes)  # greedy scheduling's bound
    z = cases.vae_latents("two_tiles")
    with torch.no_grad():
        assert torch.equal(parallel_vae_decode(vae, z, None), vae.decode(z))
    with pytest.raises(ValueError, match=r"\(B, C, T, h, w\)"):
        parallel_vae_decode(vae, z[0], None)


def test_dit_rejects_ulysses_degree_not_dividing_heads():
    from hyvideo.parallel import SequenceParallelConfig, SequenceParallelState

    state = SequenceParallelState(SequenceParallelConfig(3, 1), 0, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"does not divide the number of attention heads \(4\)"):
        cases.build_dit().enable_sequence_parallel(state)
