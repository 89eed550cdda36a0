"""How the launched processes are arranged: CFG branches x ring x Ulysses, chosen or checked, and built.

Global rank layout (outermost first)::

    rank = cfg_branch * (U*R) + ring_rank * U + ulysses_rank

The CFG split (``--cfg-parallel``: branch 0 denoises the negative prompt, branch 1 the positive) is outermost
because it exchanges one velocity per step, the ring next (one K/V block per step of the ring, overlapped with
compute), Ulysses innermost because its all-to-alls are on the critical path: so Ulysses groups are
consecutive ranks, which torchrun places on one node.

`choose_layout` picks U x R (x 2) from the world size when no degree is given; `ParallelGroups` holds what
every rank needs afterwards: the state of all ranks (seed, initial noise, VAE tiles, who writes), the state of
its own sequence-parallel group (the DiT's tokens and, with --shard-weights, its weight shards) and, with
--cfg-parallel, its branch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hyvideo.parallel.groups import (
    DEFAULT_TIMEOUT_S,
    SequenceParallelConfig,
    SequenceParallelState,
    build_groups,
    default_device,
    single_process_state,
)

logger = logging.getLogger(__name__)

NEGATIVE, POSITIVE = 0, 1  # the two --cfg-parallel branches, in the order of the CFG batch


@dataclass(frozen=True)
class ParallelLayout:
    """U x R sequence parallelism, replicated `cfg_degree` times (2 with --cfg-parallel), and why."""

    ulysses_degree: int
    ring_degree: int
    cfg_degree: int = 1
    reason: str = "given"

    @property
    def sequence_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.cfg_degree * self.sequence_degree

    def describe(self) -> str:
        cfg = "2 CFG branches x " if self.cfg_degree == 2 else ""
        return f"{cfg}ulysses {self.ulysses_degree} x ring {self.ring_degree} ({self.reason})"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_layout(
    world_size: int, num_heads: int, *, ranks_per_node: int | None = None, cfg_parallel: bool = False
) -> ParallelLayout:
    """The automatic layout: Ulysses as wide as the heads and one node allow, the rest on the ring.

    Args:
        world_size: processes launched (torchrun's WORLD_SIZE).
        num_heads: attention heads of the DiT (Ulysses scatters whole heads, so U must divide it).
        ranks_per_node: processes per node (LOCAL_WORLD_SIZE); None = all on one node. Ulysses groups stay
            inside a node (their all-to-alls are the latency-bound traffic), the ring may cross nodes.
        cfg_parallel: split the world into two halves, one per guidance branch.
    Returns:
        U = the largest divisor of the per-branch world size that also divides `num_heads` and
        `ranks_per_node`; R = the rest.
    Raises:
        ValueError: --cfg-parallel with an odd world size, or a world size < 1.
    """
    if world_size < 1 or num_heads < 1:
        raise ValueError(f"world size and head count must be >= 1, got {world_size} and {num_heads}")
    cfg = 2 if cfg_parallel else 1
    if world_size % cfg:
        raise ValueError(f"--cfg-parallel splits the processes into two equal halves: launch an even number "
                         f"of processes, not {world_size}")
    per_branch = world_size // cfg
    node = ranks_per_node if ranks_per_node and ranks_per_node > 0 else world_size
    ulysses = max(d for d in _divisors(per_branch) if num_heads % d == 0 and node % d == 0)
    ring = per_branch // ulysses
    per_node = f" and the {node} ranks per node" if node < world_size else ""
    branch = " per CFG branch" if cfg == 2 else ""
    reason = (f"automatic: the largest divisor of the {per_branch} ranks{branch} that divides the "
              f"{num_heads} heads{per_node} goes to Ulysses, the rest to the ring")
    return ParallelLayout(ulysses, ring, cfg, reason)


def given_layout(ulysses_degree: int, ring_degree: int, *, cfg_parallel: bool = False) -> ParallelLayout:
    """The layout of explicit --ulysses-degree / --ring-degree (checked against the world by the caller)."""
    return ParallelLayout(ulysses_degree, ring_degree, 2 if cfg_parallel else 1, "given by the flags")


# --------------------------------------------------------------------------------------------------
# The groups of one rank
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CfgBranch:
    """This rank's guidance branch under --cfg-parallel and the pair group that exchanges velocities."""

    branch: int  # NEGATIVE or POSITIVE
    pair_group: object  # {negative rank, positive rank} with the same place in their sequence groups

    def exchange(self, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This branch's (B, C, T, H, W) velocity -> (v_negative, v_positive), the same on both ranks."""
        wire = velocity.contiguous()
        parts = [torch.empty_like(wire) for _ in range(2)]
        dist.all_gather(parts, wire, group=self.pair_group)  # group rank order = branch order
        return parts[NEGATIVE], parts[POSITIVE]


@dataclass(frozen=True)
class ParallelGroups:
    """Everything parallel about one rank: all ranks, its sequence-parallel group, its CFG branch."""

    world: SequenceParallelState  # every rank: seed, initial noise, VAE tiles; its rank 0 writes files
    sequence: SequenceParallelState  # the U x R group that splits the DiT's tokens (and shards its weights)
    cfg: CfgBranch | None
    layout: ParallelLayout

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def enabled(self) -> bool:
        return self.world.enabled


def as_parallel_groups(state: SequenceParallelState | ParallelGroups | None) -> ParallelGroups:
    """A plain sequence-parallel state (or None: one process) as `ParallelGroups` without CFG split."""
    if isinstance(state, ParallelGroups):
        return state
    state = state if state is not None else single_process_state(default_device(None))
    layout = ParallelLayout(state.ulysses_degree, state.ring_degree)
    return ParallelGroups(world=state, sequence=state, cfg=None, layout=layout)


def init_parallel_groups(
    layout: ParallelLayout,
    *,
    rank: int,
    world_size: int,
    local_rank: int | None = None,
    device: torch.device | str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ParallelGroups:
    """Initialise torch.distributed (env://, as torchrun sets it up) and build every group of `layout`.

    Every rank must call this with the same layout. Without --cfg-parallel the world and the sequence group
    are the same state (what `init_sequence_parallel` builds).
    """
    if layout.world_size != world_size:
        raise ValueError(f"the layout {layout.describe()} needs {layout.world_size} processes, "
                         f"{world_size} were launched")
    device = torch.device(device) if device is not None else default_device(local_rank)
    if world_size == 1:
        state = single_process_state(device)
        return ParallelGroups(state, state, None, layout)
    owns = not dist.is_initialized()
    if owns:
        if device.type != "cpu":
            torch.accelerator.set_device_index(device.index or 0)
        dist.init_process_group(backend=dist.get_default_backend_for_device(device), rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
    timeout = timedelta(seconds=timeout_s)
    rank, backend = dist.get_rank(), str(dist.get_backend())
    config = SequenceParallelConfig(layout.ulysses_degree, layout.ring_degree)
    size = layout.sequence_degree
    ulysses_group, ring_group = build_groups(config, rank, timeout_s, replicas=layout.cfg_degree)
    common = dict(device=device, backend=backend, timeout_s=timeout_s)
    cfg = half = None
    if layout.cfg_degree == 2:
        halves = [dist.new_group(list(range(b * size, (b + 1) * size)), timeout=timeout) for b in range(2)]
        pairs = [dist.new_group([local, size + local], timeout=timeout) for local in range(size)]
        branch, local = divmod(rank, size)
        half = halves[branch]
        cfg = CfgBranch(branch=branch, pair_group=pairs[local])
    # The world state: every rank in one ring-shaped config (its attention groups are never used; the
    # default group carries its broadcasts and the VAE tiles).
    world = SequenceParallelState(
        config=config if cfg is None else SequenceParallelConfig(1, world_size), rank=rank,
        world_size=world_size, ulysses_group=ulysses_group if cfg is None else None,
        ring_group=ring_group if cfg is None else None, owns_process_group=owns, **common)
    sequence = world if cfg is None else SequenceParallelState(
        config=config, rank=rank % size, world_size=size, ulysses_group=ulysses_group, ring_group=ring_group,
        group=half, rank_offset=rank - rank % size, **common)
    logger.info("parallel layout: %s; rank %d/%d, backend %s, device %s", layout.describe(), rank, world_size,
                backend, device)
    return ParallelGroups(world=world, sequence=sequence, cfg=cfg, layout=layout)
