"""--ulysses-degree / --ring-degree and the multi-GPU flags (--cfg-parallel, --shard-weights)."""

from __future__ import annotations

import argparse

from hyvideo.config.base_flags import resolve_offload_mode
from hyvideo.config.launch import LaunchEnv, launch_env


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Parallel args")
    # Differs: default None, not 1: with neither degree given, torchrun's process count is split
    # automatically (1 x 1 in one process, as before); one degree given leaves the other at 1.
    group.add_argument("--ulysses-degree", type=int, default=None,
                       help="Ulysses sequence-parallel degree (default: chosen from the process count).")
    # Differs: the original's help text says "Ulysses degree".
    group.add_argument("--ring-degree", type=int, default=None,
                       help="Ring-attention sequence-parallel degree (default: chosen from the process "
                            "count).")


def _add_multigpu_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Multi-GPU args (torchrun)")
    group.add_argument("--cfg-parallel", action="store_true",
                       help="With --cfg-scale > 1: half of the processes denoise the negative prompt, half "
                            "the positive; velocities are combined after each step (2 x U x R processes).")
    group.add_argument("--shard-weights", action="store_true",
                       help="Shard the DiT's weights over all processes (PyTorch FSDP2): "
                            "each GPU holds ~1/N of them and gathers a block just before it runs.")


def parallel_layout_errors(
    ulysses_degree: int | None, ring_degree: int | None, env: LaunchEnv, *, cfg_parallel: bool = False
) -> list[str]:
    """Problems with --ulysses-degree x --ring-degree (x 2 with --cfg-parallel) against the process count.

    No degree at all: the layout is chosen at launch (only --cfg-parallel's even split is checked here);
    one degree given: the other is 1.
    """
    cfg = 2 if cfg_parallel else 1
    if ulysses_degree is None and ring_degree is None:
        if env.world_size % cfg == 0 and (env.under_launcher or not cfg_parallel):
            return []
        return [f"--cfg-parallel puts the two guidance branches on two halves of the processes: launch an "
                f"even number of them (torchrun --nproc_per_node=2 or more), not {env.world_size}"]
    ulysses_degree, ring_degree = ulysses_degree or 1, ring_degree or 1
    degree = ulysses_degree * ring_degree * cfg
    if degree == env.world_size or min(ulysses_degree, ring_degree) < 1:
        return []
    product = f"--ulysses-degree {ulysses_degree} x --ring-degree {ring_degree}" + (
        " x 2 (--cfg-parallel)" if cfg_parallel else "")
    if not env.under_launcher:
        return [f"{product} = {degree} needs {degree} processes: launch with torchrun "
                f"--nproc_per_node={degree} sample_video.py ... (or give no degree: they are then chosen "
                f"from the process count)"]
    per_branch = env.world_size // cfg
    return [f"{product} = {degree}, but torchrun launched {env.world_size} processes: choose degrees whose "
            f"product is {per_branch} (e.g. --ulysses-degree {per_branch} --ring-degree 1, or --ring-degree "
            f"{per_branch} for any head count), give no degree to have them chosen, or launch with "
            f"--nproc_per_node={degree}"]


def multigpu_errors(args: argparse.Namespace) -> list[str]:
    """Problems with the parallel layout and the multi-GPU flags (each rank decides alike)."""
    try:
        env = launch_env()
    except ValueError as exc:
        return [str(exc)]
    errors = parallel_layout_errors(args.ulysses_degree, args.ring_degree, env,
                                    cfg_parallel=args.cfg_parallel)
    if args.cfg_parallel and args.cfg_scale <= 1.0:
        errors.append(f"--cfg-parallel splits the two classifier-free-guidance branches, but --cfg-scale "
                      f"{args.cfg_scale:g} runs only one: add --cfg-scale > 1 or drop --cfg-parallel")
    if args.shard_weights and not env.under_launcher:
        errors.append("--shard-weights shards the DiT over the processes of a torchrun launch; one process "
                      "has nothing to share it with: launch with torchrun --nproc_per_node=N or drop it")
    if args.shard_weights and resolve_offload_mode(args) in ("block", "sequential"):
        errors.append(f"--shard-weights keeps each GPU's share of the DiT resident, which --offload-mode "
                      f"{resolve_offload_mode(args)} (or --use-cpu-offload) contradicts: use --offload-mode "
                      f"model (text encoders and VAE loaded per stage) or none")
    together = [flag for flag, on in (("--lora", args.lora), ("--compile", args.compile),
                                      ("--fp8-gemm", args.fp8_gemm)) if on]
    if args.shard_weights and together:
        errors.append(f"--shard-weights has not been tested with {', '.join(together)} (they change the "
                      f"DiT's layers that FSDP2 shards): drop one of them")
    if args.cfg_parallel and args.cache in ("teacache", "fbcache"):
        errors.append(f"--cache {args.cache} decides from each branch's own values, so the two "
                      f"--cfg-parallel halves would skip different steps: use --cache magcache (decided by "
                      f"the step alone) or drop --cfg-parallel")
    return errors
