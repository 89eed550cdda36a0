"""torchrun worker: the step caches under sequence parallelism (CPU, gloo).

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 cache_worker.py OUT.pt UxR ...

For every layout and every case of CACHE_CASES, every rank runs the CFG pipeline of sp_cases.py (75 image
tokens: the last rank holds padding) with that step cache. Rank 0 saves the latents and computed steps of
rank 0, and whether every rank computed the same steps and returned the same latents.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import hyvideo` / `tests`

from hyvideo.diffusion.cache import CacheConfig  # noqa: E402
from hyvideo.parallel import destroy, init_sequence_parallel  # noqa: E402
from tests.parallel_workers import sp_cases as cases  # noqa: E402

STEPS = 8
# name -> settings; thresholds chosen so that each policy reuses some steps on these random weights
CACHE_CASES = {
    "magcache": CacheConfig("magcache"),
    "teacache": CacheConfig("teacache", threshold=0.15),
    "fbcache": CacheConfig("fbcache", threshold=0.4),
    "calibrate": CacheConfig("none", calibrate=True),
}


def run_case(pipe, cache: CacheConfig, seed: int):
    """Latents and the step-cache record of one CFG pipeline call."""
    out = pipe(prompt_conditions=cases.text_conditions((7,), seed=21),
               negative_conditions=cases.text_conditions((4,), seed=22),
               generator=[torch.Generator().manual_seed(seed)], show_progress=False, output_type="latent",
               cache=cache, **{**cases.PIPE, "num_inference_steps": STEPS})
    return out.latents, out.step_cache


def main() -> None:
    torch.set_num_threads(1)
    out_path, layouts = Path(sys.argv[1]), [tuple(map(int, a.split("x"))) for a in sys.argv[2:]]
    states = [init_sequence_parallel(u, r, timeout_s=120) for u, r in layouts]
    dit = cases.build_dit()
    results = {}
    for state in states:
        dit.enable_sequence_parallel(state)
        pipe = cases.build_pipeline(dit, None, parallel=state)
        for name, cache in CACHE_CASES.items():
            latents, record = run_case(pipe, cache, seed=cases.PIPE_SEED + state.rank)  # rank 0's noise
            gathered: list = [None] * state.world_size
            dist.all_gather_object(gathered, (latents, record))
            key = f"{state.ulysses_degree}x{state.ring_degree}/{name}"
            results[key] = {
                "latents": latents, "record": record,
                "ranks_equal": all(torch.equal(t, latents) and r == record for t, r in gathered),
            }
        dit.enable_sequence_parallel(None)
    if states[0].is_main:
        torch.save(results, out_path)
    destroy(states[0])


if __name__ == "__main__":
    main()
