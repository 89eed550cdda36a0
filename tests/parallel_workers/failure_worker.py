"""torchrun worker: one rank fails while the others wait in a collective; every rank must end promptly.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=N failure_worker.py  (N even)

Every rank runs its work through the runner's guard (`run_guarded`), as sample_video.py does, and builds the
--cfg-parallel groups (`init_parallel_groups`). The last rank raises before the collective; the others block
in it: the CFG pair exchange on a subgroup, then an all-reduce over every rank. The process groups' timeout is
long (300 s), so the launch only ends in seconds if the failing rank really exits and its peers notice.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import hyvideo`

from hyvideo.config import RuntimeConfig, launch_env  # noqa: E402
from hyvideo.parallel.layout import choose_layout, init_parallel_groups  # noqa: E402
from hyvideo.runner import run_guarded  # noqa: E402


def work(runtime: RuntimeConfig) -> None:
    layout = choose_layout(runtime.world_size, 4, cfg_parallel=True)
    groups = init_parallel_groups(layout, rank=runtime.rank, world_size=runtime.world_size, timeout_s=300)
    state = groups.world
    if state.rank == state.world_size - 1:
        raise RuntimeError(f"injected failure on rank {state.rank}")
    groups.cfg.exchange(torch.ones(4))  # the other ranks wait here for the failed one (a subgroup)
    dist.all_reduce(torch.ones(4))
    print(f"RANK {state.rank} PASSED THE COLLECTIVE", flush=True)  # must never be reached


def main() -> int:
    env = launch_env()
    runtime = RuntimeConfig(
        save_path=Path("."), disable_autocast=False, offload_mode="none",
        plan_memory=None, ulysses_degree=1,
        ring_degree=env.world_size, crf=17, save_latents=False, decode_latents=None,
        rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
    )
    return run_guarded(lambda: work(runtime), runtime)


if __name__ == "__main__":
    sys.exit(main())
