"""torchrun worker: CFG-parallel and FSDP2-sharded DiT weights (CPU, gloo), every case in one launch.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=N multigpu_worker.py OUT.pt CKPT_DIR

CKPT_DIR holds `dit.pt` (the sp_cases DiT in float32) and `dit_fp8.pt` + `dit_fp8_map.pt` (its fp8
quantisation), written by tests/test_parallel_multigpu.py. Cases, each on every rank:
* ``cfg``: the CFG pipeline with --cfg-parallel (two halves of N/2 ranks, layout chosen automatically),
  at 2 processes decoded by all ranks' VAE tiles (the other pipeline runs stop at the latents);
* ``shard/<fmt>``: the DiT loaded sharded over all N ranks (bf16-file-as-fp32 and fp8), its forward on every
  sp_cases DiT input under N-way sequence parallelism, and the whole pipeline;
* ``cfg_shard/fp8``: --cfg-parallel with the weights sharded over all N ranks (both branches).
Rank 0 saves the outputs, whether all ranks agree bitwise, and per-rank facts (bytes held, shapes seen).
Every pipeline run seeds its generator with a different value per rank: only rank 0's noise may be used.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import hyvideo` / `tests`

from hyvideo.parallel.layout import choose_layout, init_parallel_groups  # noqa: E402
from hyvideo.parallel.weight_sharding import (  # noqa: E402
    gathered_bytes_per_forward,
    load_sharded_dit,
    local_weight_bytes,
)
from tests.parallel_workers import sp_cases as cases  # noqa: E402
from tests.parallel_workers.dit_pipeline_worker import Recorder  # noqa: E402

FILES = {"fp32": ("dit.pt", False), "fp8": ("dit_fp8.pt", True)}


def load(ckpt: Path, fmt: str, state):
    name, fp8 = FILES[fmt]
    return load_sharded_dit(cases.DIT4, ckpt / name, state, use_fp8=fp8, dtype=torch.float32,
                            attention_backend="sdpa")


def run_pipeline(groups, dit, vae, record: Recorder, tag: str, *, decode: bool = False) -> None:
    dit.enable_sequence_parallel(groups.sequence)
    pipe = cases.build_pipeline(dit, vae, parallel=groups.world, cfg_parallel=groups.cfg)
    seed = cases.PIPE_SEED + groups.world.rank  # rank 0's noise must win
    out = cases.run_pipeline(pipe, seed=seed, output_type="pt" if decode else "latent")
    record(f"{tag}/latents", out.latents)
    if decode:
        record(f"{tag}/video", out.videos)


def main() -> None:
    torch.set_num_threads(1)
    out_path, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    world_size = dist.get_world_size()
    plain = init_parallel_groups(choose_layout(world_size, cases.DIT4.heads_num), rank=dist.get_rank(),
                                 world_size=world_size, timeout_s=120)
    split = init_parallel_groups(choose_layout(world_size, cases.DIT4.heads_num, cfg_parallel=True),
                                 rank=dist.get_rank(), world_size=world_size, timeout_s=120)
    record = Recorder(plain.world)
    vae = cases.build_vae()
    record.fact("cfg/branch", split.cfg.branch)
    record.fact("cfg/layout", (split.layout.ulysses_degree, split.layout.ring_degree))
    run_pipeline(split, cases.build_dit(), vae, record, "cfg", decode=world_size == 2)  # decode: slow
    for fmt in FILES:
        dit = load(ckpt, fmt, plain.sequence)
        record.fact(f"shard/{fmt}/local_bytes", local_weight_bytes(dit))
        record.fact(f"shard/{fmt}/gathered_bytes", gathered_bytes_per_forward(dit))
        dit.enable_sequence_parallel(plain.sequence)
        with torch.no_grad():
            for name in cases.DIT_CASES:
                record(f"shard/{fmt}/dit/{name}", dit(**cases.dit_inputs(name)))
        run_pipeline(plain, dit, vae, record, f"shard/{fmt}/pipe")
    dit = load(ckpt, "fp8", split.world)
    record.fact("cfg_shard/fp8/local_bytes", local_weight_bytes(dit))
    run_pipeline(split, dit, vae, record, "cfg_shard/fp8/pipe")
    if plain.world.is_main:
        torch.save({"outputs": record.outputs, "ranks_equal": record.ranks_equal, "facts": record.facts},
                   out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
