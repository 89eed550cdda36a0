"""torchrun worker: the sequence-parallel DiT, the whole pipeline, the tile-parallel VAE decode (CPU, gloo).

Usage: python -m torch.distributed.run --standalone --nproc_per_node=N dit_pipeline_worker.py OUT.pt UxR ...

For every layout, every rank runs every case of sp_cases.py. Rank 0 saves {"UxR/kind/case": output} plus, per
output, whether every rank's output is bitwise equal to rank 0's, whether the ranks agreed on a drawn seed,
and facts showing that the work was split: the image tokens each rank's final layer saw, and the VAE tiles
each rank decoded. The pipeline runs with a different generator seed on each rank, so it only equals the
single-process run with rank 0's seed if the initial noise really is rank 0's.
tests/test_parallel_dit_pipeline.py compares the outputs with single-process references.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import hyvideo` / `tests`

from hyvideo.inference import agree_seed  # noqa: E402
from hyvideo.parallel import SequenceParallelState, destroy, init_sequence_parallel  # noqa: E402
from hyvideo.parallel.vae_decode import parallel_vae_decode  # noqa: E402
from tests.parallel_workers import sp_cases as cases  # noqa: E402


class Recorder:
    """Keeps rank 0's outputs and whether all ranks produced the same bits."""

    def __init__(self, state: SequenceParallelState) -> None:
        self.state = state
        self.outputs: dict[str, torch.Tensor] = {}
        self.ranks_equal: dict[str, bool] = {}
        self.facts: dict[str, list] = {}  # key -> one value per rank

    def __call__(self, key: str, tensor: torch.Tensor) -> None:
        gathered: list = [None] * self.state.world_size
        dist.all_gather_object(gathered, tensor.detach().cpu())
        self.outputs[key] = gathered[0]
        self.ranks_equal[key] = all(torch.equal(t, gathered[0]) for t in gathered)

    def fact(self, key: str, value) -> None:
        gathered: list = [None] * self.state.world_size
        dist.all_gather_object(gathered, value)
        self.facts[key] = gathered


def run_layout(state: SequenceParallelState, dit, vae, record: Recorder) -> None:
    tag = f"{state.ulysses_degree}x{state.ring_degree}"
    dit.enable_sequence_parallel(state)
    final_tokens: list[int] = []  # image tokens reaching the final layer on this rank, per forward
    hook = dit.final_layer.register_forward_hook(lambda mod, args, out: final_tokens.append(args[0].shape[1]))
    decoded: list[int] = []  # indices of the VAE tiles this rank decoded
    decode_tile = vae.decode_tile
    vae.decode_tile = lambda z, tile: (decoded.append(tile.index), decode_tile(z, tile))[1]
    with torch.no_grad():
        for name in cases.DIT_CASES:
            record(f"{tag}/dit/{name}", dit(**cases.dit_inputs(name)))
            record.fact(f"{tag}/dit/{name}/final_layer_tokens", final_tokens.pop())
        dit.set_chunk_tokens(4)  # token chunking inside the blocks, on each rank's share of the tokens
        record(f"{tag}/dit/odd_mixed_text/chunked", dit(**cases.dit_inputs("odd_mixed_text")))
        final_tokens.pop()
        dit.set_chunk_tokens(None)
        for name in cases.VAE_CASES:
            cases.set_vae_tiling(vae, name)
            record(f"{tag}/vae/{name}", parallel_vae_decode(vae, cases.vae_latents(name), state))
            record.fact(f"{tag}/vae/{name}/tiles", sorted(decoded))
            decoded.clear()
    hook.remove()
    del vae.decode_tile  # back to the method
    pipe = cases.build_pipeline(dit, vae, parallel=state)
    out = cases.run_pipeline(pipe, seed=cases.PIPE_SEED + state.rank)  # rank 0's noise must win
    record(f"{tag}/pipe/latents", out.latents)
    record(f"{tag}/pipe/video", out.videos)
    seeds: list = [None] * state.world_size
    dist.all_gather_object(seeds, agree_seed(None, state))
    record.ranks_equal[f"{tag}/seed"] = len(set(seeds)) == 1
    dit.enable_sequence_parallel(None)


def main() -> None:
    torch.set_num_threads(1)
    out_path, layouts = Path(sys.argv[1]), [tuple(map(int, a.split("x"))) for a in sys.argv[2:]]
    # The first call creates the process group; the others reuse it and add their own subgroups.
    states = [init_sequence_parallel(u, r, timeout_s=120) for u, r in layouts]
    dit, vae = cases.build_dit(), cases.build_vae()
    record = Recorder(states[0])
    for state in states:
        run_layout(state, dit, vae, record)
    if states[0].is_main:
        payload = {"outputs": record.outputs, "ranks_equal": record.ranks_equal, "facts": record.facts}
        torch.save(payload, out_path)
    destroy(states[0])


if __name__ == "__main__":
    main()
