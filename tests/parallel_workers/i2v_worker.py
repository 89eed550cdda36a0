"""torchrun worker: the token-replace DiT and the I2V sampling loop under sequence parallelism (CPU, gloo).

Usage: python -m torch.distributed.run --standalone --nproc_per_node=3 i2v_worker.py OUT.pt

Ring degree 3 over 2 latent frames of 15 tokens: 10 tokens per rank, so rank 0 holds only first-frame
tokens, rank 1 five of each and rank 2 none; the first-frame range must be cut per rank correctly. Rank 0
saves its outputs; tests/test_i2v_parallel.py compares them with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

from hyvideo.parallel import destroy, init_sequence_parallel  # noqa: E402
from tests.parallel_workers import i2v_cases as cases  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    state = init_sequence_parallel(1, 3, timeout_s=120)
    dit = cases.build_dit()
    dit.enable_sequence_parallel(state)
    first_frame_tokens = []
    dit.double_blocks[0].register_forward_hook(
        lambda mod, args, kwargs, out: first_frame_tokens.append(kwargs["token_replace"].tokens),
        with_kwargs=True,
    )
    with torch.no_grad():
        outputs = {"dit": dit(**cases.dit_inputs())}
        outputs["pipe"] = cases.run_pipeline(cases.build_pipeline(dit, parallel=state)).latents
    counts: list = [None] * state.world_size
    dist.all_gather_object(counts, first_frame_tokens[0])
    if state.is_main:
        torch.save({**outputs, "first_frame_tokens": counts}, sys.argv[1])
    destroy(state)


if __name__ == "__main__":
    main()
