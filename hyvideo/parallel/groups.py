"""Process groups for sequence parallelism on a U x R (Ulysses x ring) layout.

Rank layout (the xfuser / yunchang convention): global rank ``r = ring_rank * U + ulysses_rank``. Each Ulysses
group is U consecutive ranks; each ring group takes the rank with the same Ulysses index from every Ulysses
group::

    U=2, R=2:  Ulysses groups {0, 1} {2, 3};   ring groups {0, 2} {1, 3}
    U=4, R=1:  Ulysses group {0, 1, 2, 3};     no ring
    U=1, R=4:  no Ulysses;                      ring group {0, 1, 2, 3}

Image tokens are split into P = U*R equal chunks in global rank order (see ``sharding.py``), so the
Ulysses group with ring rank i holds the contiguous "ring block" i made of U chunks. After the Ulysses
all-to-all every member of that group holds the whole block for its H/U heads, and the ring passes blocks
between the groups.

Nothing here reads environment variables: the caller passes rank / world size / local rank, or leaves them to
``torch.distributed``'s own ``env://`` initialisation (which torchrun sets up).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
_SEED_LIMIT = 2**63  # seeds travel as int64


@dataclass(frozen=True)
class SequenceParallelConfig:
    """How many ranks split the heads (Ulysses) and how many pass K/V blocks around (ring)."""

    ulysses_degree: int = 1
    ring_degree: int = 1

    def __post_init__(self) -> None:
        for name in ("ulysses_degree", "ring_degree"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.ring_degree


@dataclass(frozen=True)
class SequenceParallelState:
    """This rank's place in the U x R layout plus its process groups (None where a degree is 1)."""

    config: SequenceParallelConfig
    rank: int
    world_size: int
    device: torch.device
    backend: str | None = None
    ulysses_group: object | None = None
    ring_group: object | None = None
    owns_process_group: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    # A sequence-parallel group that is part of a larger world (--cfg-parallel: one per guidance branch):
    # `group` spans its ranks (None: the default group, all ranks) and `rank_offset` is the global rank of
    # its rank 0; `rank` and `world_size` count within the group.
    group: object | None = None
    rank_offset: int = 0

    @property
    def ulysses_degree(self) -> int:
        return self.config.ulysses_degree

    @property
    def ring_degree(self) -> int:
        return self.config.ring_degree

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.config.ulysses_degree

    @property
    def ring_rank(self) -> int:
        return self.rank // self.config.ulysses_degree

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part (collectives are needed)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where small control tensors (seeds) must live for this backend's collectives."""
        return torch.device("cpu") if self.backend in (None, "gloo") else self.device

    @property
    def global_main_rank(self) -> int:
        """Global rank of this group's rank 0 (the source of its broadcasts)."""
        return self.rank_offset

    def ring_peer(self, offset: int) -> int:
        """Global rank of the ring neighbour `offset` steps ahead (same Ulysses index)."""
        u = self.config.ulysses_degree
        ring_rank = (self.ring_rank + offset) % self.config.ring_degree
        return self.rank_offset + ring_rank * u + self.ulysses_rank

    def check_num_heads(self, num_heads: int) -> None:
        """Raise ValueError unless the Ulysses degree divides `num_heads` (call once from the model)."""
        check_num_heads(num_heads, self.config.ulysses_degree)


def check_layout(config: SequenceParallelConfig, world_size: int) -> None:
    """Raise ValueError unless ulysses_degree * ring_degree equals the number of processes."""
    if config.world_size != world_size:
        raise ValueError(
            f"Sequence-parallel layout mismatch: ulysses_degree ({config.ulysses_degree}) x ring_degree "
            f"({config.ring_degree}) = {config.world_size}, but {world_size} process(es) were launched. "
            f"Choose degrees whose product is {world_size} (e.g. --ulysses-degree 1 --ring-degree "
            f"{world_size}, which suits any head count), or launch {config.world_size} process(es) with "
            f"torchrun --nproc_per_node={config.world_size}."
        )


def check_num_heads(num_heads: int, ulysses_degree: int) -> None:
    """Raise ValueError unless `ulysses_degree` divides `num_heads` (Ulysses scatters whole heads)."""
    if num_heads % ulysses_degree != 0:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"ulysses_degree={ulysses_degree} does not divide the number of attention heads ({num_heads}). "
            f"Use a ulysses_degree in {divisors} and put the remaining factor of the process count into "
            f"ring_degree (ring attention has no head constraint)."
        )


def single_process_state(device: torch.device | str | None = None) -> SequenceParallelState:
    """A trivial state for one process: no process group, every helper is a no-op or a local call."""
    return SequenceParallelState(
        config=SequenceParallelConfig(1, 1),
        rank=0,
        world_size=1,
        device=torch.device(device) if device is not None else torch.device("cpu"),
    )


def default_device(local_rank: int | None) -> torch.device:
    """The accelerator with index `local_rank` when one is available, else the CPU."""
    accel = getattr(torch, "accelerator", None)
    if accel is not None and accel.is_available():
        kind, count = accel.current_accelerator().type, accel.device_count()
        if (local_rank or 0) >= count:
            raise ValueError(
                f"local rank {local_rank} has no {kind} device: only {count} are visible on this node. "
                f"Launch at most {count} process(es) per node (torchrun --nproc_per_node={count})."
            )
        return torch.device(kind, local_rank or 0)
    return torch.device("cpu")


def init_sequence_parallel(
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
    init_method: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> SequenceParallelState:
    """Initialise torch.distributed (if needed) and build the Ulysses and ring process groups.

    Args:
        ulysses_degree: U, ranks that split the attention heads (must divide the head count).
        ring_degree: R, ranks that pass K/V blocks around a ring. U * R must equal the world size.
        rank, world_size: this process's rank and the process count; None lets torch.distributed read
            them from its ``env://`` init (what torchrun sets up). When world_size is given the layout is
            checked before any process group is created.
        local_rank: the device index on this node; used only when `device` is None.
        device: the compute device. None: accelerator ``local_rank`` if there is one, else the CPU.
        backend: the torch.distributed backend. None: the default for `device` ("nccl" for CUDA, "gloo"
            for the CPU).
        init_method: passed to ``init_process_group`` (None = ``env://``).
        timeout_s: collective timeout; a rank that dies makes the others fail after at most this long
            instead of hanging.

    Returns:
        The state every other function of this package takes. With U = R = 1 and no process group
        already initialised, no process group is created.
    """
    config = SequenceParallelConfig(ulysses_degree, ring_degree)
    if world_size is not None:
        check_layout(config, world_size)
    device = torch.device(device) if device is not None else default_device(local_rank)
    if not dist.is_initialized() and config.world_size == 1:
        return single_process_state(device)

    owns = not dist.is_initialized()
    if owns:
        backend = backend or dist.get_default_backend_for_device(device)
        if device.type != "cpu":
            torch.accelerator.set_device_index(device.index or 0)
        kwargs = {} if rank is None or world_size is None else {"rank": rank, "world_size": world_size}
        dist.init_process_group(
            backend=backend, init_method=init_method, timeout=timedelta(seconds=timeout_s), **kwargs
        )
    try:
        check_layout(config, dist.get_world_size())
    except ValueError:
        if owns:
            dist.destroy_process_group()
        raise
    ulysses_group, ring_group = build_groups(config, dist.get_rank(), timeout_s)
    state = SequenceParallelState(
        config=config,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=device,
        backend=str(dist.get_backend()),
        ulysses_group=ulysses_group,
        ring_group=ring_group,
        owns_process_group=owns,
        timeout_s=timeout_s,
    )
    logger.info(
        "sequence parallel: rank %d/%d, ulysses %d (rank %d) x ring %d (rank %d), backend %s, device %s",
        state.rank, state.world_size, config.ulysses_degree, state.ulysses_rank,
        config.ring_degree, state.ring_rank, state.backend, device,
    )
    return state


def build_groups(
    config: SequenceParallelConfig, rank: int, timeout_s: float, *, replicas: int = 1
) -> tuple[object, object]:
    """Create every Ulysses and ring group (all ranks must call new_group for all of them, in order).

    `replicas` copies of the U x R layout sit side by side (global ranks ``c * U*R + local``, one copy per
    --cfg-parallel branch); `rank` is the global rank, and the groups of its own copy are returned.
    """
    u_deg, r_deg, size = config.ulysses_degree, config.ring_degree, config.world_size
    timeout = timedelta(seconds=timeout_s)
    ulysses_group = ring_group = None
    mine, local = divmod(rank, size)
    for copy in range(replicas):
        base = copy * size
        if u_deg > 1:
            for ring_idx in range(r_deg):
                group = dist.new_group([base + ring_idx * u_deg + u for u in range(u_deg)], timeout=timeout)
                if copy == mine and ring_idx == local // u_deg:
                    ulysses_group = group
        if r_deg > 1:
            for u in range(u_deg):
                ranks = [base + ring_idx * u_deg + u for ring_idx in range(r_deg)]
                group = dist.new_group(ranks, timeout=timeout)
                if copy == mine and u == local % u_deg:
                    ring_group = group
    return ulysses_group, ring_group


def is_main_process(state: SequenceParallelState | None = None) -> bool:
    """True on global rank 0 (and always in a single process): the rank that saves files and logs."""
    if state is not None:
        return state.is_main
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_seed(seed: int | None, state: SequenceParallelState) -> int:
    """Return the same seed on every rank: rank 0's `seed`, or a random one drawn on rank 0 when None.

    Parity: the original lets every rank draw its own seed when --seed is unset, which gives each rank
    different noise and a broken video; here rank 0 decides for everyone.
    """
    if seed is not None and not 0 <= int(seed) < _SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}.")
    value = int(seed) if seed is not None else None
    if state.is_main and value is None:
        value = random.SystemRandom().randrange(2**32)
    if not state.enabled:
        return int(value)
    tensor = torch.tensor([value if state.is_main else 0], dtype=torch.int64, device=state.comm_device)
    dist.broadcast(tensor, src=state.global_main_rank, group=state.group)
    return int(tensor.item())


def broadcast_from_main(tensor: torch.Tensor, state: SequenceParallelState) -> torch.Tensor:
    """Return rank 0's `tensor` on every rank (same shape and dtype on all; unchanged in one process).

    Used for the initial noise, so every rank denoises the same latents even if their generators differ.
    """
    if not state.enabled:
        return tensor
    wire = as_wire(tensor).clone()  # a private buffer: the caller's tensor is never written into
    dist.broadcast(wire, src=state.global_main_rank, group=state.group)
    return wire.view(tensor.dtype) if wire.dtype != tensor.dtype else wire


def barrier(state: SequenceParallelState) -> None:
    """Wait for every rank of `state` (no-op in a single process)."""
    if state.enabled:
        dist.barrier(group=state.group)


def destroy(state: SequenceParallelState) -> None:
    """Tear down the process group if `init_sequence_parallel` created it."""
    if state.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def as_wire(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor a collective accepts: fp8 travels as its uint8 bytes (gloo/NCCL reject fp8)."""
    tensor = tensor.contiguous()
    return tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 and tensor.is_floating_point() else tensor
