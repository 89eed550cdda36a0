"""Block-level and sequential offload: the repeated blocks of a model wait in page-locked host memory and
are copied to the accelerator just before they run (the next one on a side stream), then dropped.

The stage-level API that combines this with whole-model moves is `hyvideo.lowmem.offload`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

DIT_BLOCKS: tuple[str, ...] = ("double_blocks", "single_blocks")
GRANULARITIES = ("block", "sequential")
_OFFLOADER_ATTR = "_hyvideo_offloader"
# Page-locked memory is allocated in chunks of this size: the pinned allocator rounds every request up to a
# power of two, so pinning tensors one by one can cost up to twice their size in host RAM. Larger tensors
# (the LLM's 1 GB embedding) stay pageable.
_PINNED_CHUNK_BYTES = 256 << 20
_ALIGN = 64

# -------- Devices ---------------------------------------------------------------------------------


def normalize_device(device: torch.device | str) -> torch.device:
    """`torch.device` with an explicit index for accelerators ("xpu" -> "xpu:<current>")."""
    device = torch.device(device)
    if device.index is None and device.type not in ("cpu", "meta"):
        device = torch.device(device.type, torch.get_device_module(device.type).current_device())
    return device


def _same_device(a: torch.device, b: torch.device) -> bool:
    return normalize_device(a) == normalize_device(b)


def _has_streams(device: torch.device) -> bool:
    if device.type in ("cpu", "meta") or not torch.accelerator.is_available():
        return False
    return torch.accelerator.current_accelerator().type == device.type


def empty_device_cache(device: torch.device | str) -> None:
    """Hand cached, unused blocks of an accelerator's allocator back to the driver (no-op on the CPU)."""
    device = torch.device(device)
    if _has_streams(device):
        torch.get_device_module(device.type).empty_cache()


def _module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def execution_device(module: nn.Module) -> torch.device | None:
    """Where `module` computes: the onload device of an attached offloader, else where its weights are.

    Use this instead of `next(module.parameters()).device` for a module under sequential offload, whose
    weights sit on the CPU between calls.
    """
    offloader = getattr(module, _OFFLOADER_ATTR, None)
    if offloader is not None:
        return offloader.onload_device
    tensor = next(_module_tensors(module), None)
    return None if tensor is None else tensor.device


def has_offload_hooks(module: nn.Module) -> bool:
    """Whether a BlockOffloader manages `module` or one of its submodules."""
    return any(hasattr(m, _OFFLOADER_ATTR) for m in module.modules())


# -------- Tensor slots and page-locked host copies ------------------------------------------------


class _PinnedArena:
    """Packs host copies into page-locked chunks whose size the pinned allocator does not round up."""

    def __init__(self, chunk_bytes: int = _PINNED_CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self.chunks: list[list] = []  # [buffer, bytes used]

    def copy_in(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A page-locked copy of `tensor`, or None if it is empty or larger than a chunk (left pageable)."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0 or nbytes > self.chunk_bytes:
            return None
        chunk = next((c for c in self.chunks if c[1] + nbytes <= self.chunk_bytes), None)
        if chunk is None:
            chunk = [torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True), 0]
            self.chunks.append(chunk)
        buffer, offset = chunk[0], chunk[1]
        chunk[1] = -(-(offset + nbytes) // _ALIGN) * _ALIGN
        view = buffer[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        return view


@dataclass(eq=False)
class _Slot:
    """One parameter or buffer tensor (possibly shared by several modules) managed by offloading."""

    owners: list[tuple[nn.Module, str, bool]]  # (module, attribute name, is_parameter)
    original_device: torch.device
    host: torch.Tensor | None = None
    device_tensor: torch.Tensor | None = None
    refs: int = 0

    def current(self) -> torch.Tensor:
        module, name, is_param = self.owners[0]
        return module._parameters[name].data if is_param else module._buffers[name]

    def identity(self) -> int:
        """id of the Parameter object (stable while `.data` is swapped) or of the buffer tensor."""
        module, name, is_param = self.owners[0]
        return id(module._parameters[name] if is_param else module._buffers[name])

    def attach(self, tensor: torch.Tensor) -> None:
        for module, name, is_param in self.owners:
            if not is_param:
                module._buffers[name] = tensor
                continue
            param = module._parameters[name]
            if torch._has_compatible_shallow_copy_type(param, tensor):
                param.data = tensor  # keeps the Parameter object (and ties between modules)
            else:  # e.g. CPU <-> meta: `.data` cannot change the tensor type, as in nn.Module._apply
                module._parameters[name] = nn.Parameter(tensor, requires_grad=param.requires_grad)

    def make_host_copy(self, offload_device: torch.device, *, arena: _PinnedArena | None = None) -> None:
        """Keep the tensor on `offload_device` (page-locked via `arena` if given); point the owners at it."""
        source = self.current()
        pinned = arena.copy_in(source) if arena is not None and offload_device.type == "cpu" else None
        if pinned is not None:
            self.host = pinned
        elif _same_device(source.device, offload_device):
            self.host = source
        else:
            self.host = source.to(offload_device)
        self.attach(self.host)


def _collect_slots(
    modules: Sequence[nn.Module], *, recurse: bool, skip: set[tuple[int, str]] | None = None
) -> list[_Slot]:
    """Slots for the tensors of `modules` (their own tensors only unless `recurse`), one per tensor object.

    `skip` holds (id(module), attribute name) pairs to leave out.
    """
    slots: dict[int, _Slot] = {}
    skip = skip or set()
    for root in modules:
        for module in root.modules() if recurse else (root,):
            named = [(n, p, True) for n, p in module._parameters.items()]
            named += [(n, b, False) for n, b in module._buffers.items()]
            for name, tensor, is_param in named:
                if tensor is None or (id(module), name) in skip:
                    continue
                slot = slots.setdefault(id(tensor), _Slot(owners=[], original_device=tensor.device))
                if (module, name, is_param) not in slot.owners:
                    slot.owners.append((module, name, is_param))
    return list(slots.values())


def _move_tensors(obj, device: torch.device):
    """Tensors inside (nested) tuples, lists and dicts moved to `device`; everything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        moved = [_move_tensors(o, device) for o in obj]
        return type(obj)(moved) if not hasattr(obj, "_fields") else type(obj)(*moved)
    if isinstance(obj, dict):
        return {k: _move_tensors(v, device) for k, v in obj.items()}
    return obj


# -------- Block / sequential offload --------------------------------------------------------------

_OFFLOADED, _PENDING, _RESIDENT = "offloaded", "pending", "resident"


@dataclass(eq=False)
class _Unit:
    """A module whose tensors are onloaded together (a block, or one submodule in sequential mode)."""

    module: nn.Module
    slots: list[_Slot]
    state: str = _OFFLOADED
    copied: torch.Event | None = None  # recorded on the copy stream after the prefetch copies


@dataclass
class OffloadStats:
    """Counters of what the hooks did (units made resident, dropped, copied ahead on the side stream)."""

    onloads: int = 0
    offloads: int = 0
    prefetches: int = 0


class BlockOffloader:
    """Keeps a model's blocks on the offload device and onloads each one just before its forward.

    Build it with `enable_block_offload` or `enable_sequential_offload`. `remove()` (or leaving a `with`
    block) takes the hooks off and puts every tensor back where it was.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        onload_device: torch.device | str,
        offload_device: torch.device | str = "cpu",
        blocks: Sequence[str] | None = DIT_BLOCKS,
        granularity: str = "block",
        prefetch: int = 1,
        pin_memory: bool = True,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative number of blocks, got {prefetch!r}")
        if blocks is None and granularity == "block":
            raise ValueError("block granularity needs the names of the block lists, e.g. blocks=('layers',)")
        if hasattr(model, _OFFLOADER_ATTR):
            raise ValueError(f"{type(model).__name__} already has an offloader: call its remove() first")
        self.model = model
        self.onload_device = normalize_device(onload_device)
        self.offload_device = normalize_device(offload_device)
        self.granularity = granularity
        self.prefetch = prefetch if granularity == "block" else 0
        self.stats = OffloadStats()
        self._streams = _has_streams(self.onload_device)
        pin = pin_memory and self._streams and self.offload_device.type == "cpu"
        use_copy_stream = self._streams and self.prefetch > 0
        self._copy_stream = torch.Stream(device=self.onload_device) if use_copy_stream else None
        self._released: list[torch.Event] = []  # compute-stream events of units dropped since the last wait
        self._blocks_started = False  # whether a unit has run in the current model forward
        block_modules = _resolve_blocks(model, blocks)
        self._units = self._build_units(block_modules, pin)
        self._resident = self._move_resident()
        self._handles = self._register_hooks()
        setattr(model, _OFFLOADER_ATTR, self)
        logger.info(
            "%s offload of %s: %d units on %s (pinned: %s), onloaded to %s, prefetch %d",
            granularity, type(model).__name__, len(self._units), self.offload_device, pin, self.onload_device,
            self.prefetch,
        )

    # -- construction --

    def _build_units(self, block_modules: list[nn.Module] | None, pin: bool) -> list[_Unit]:
        roots = block_modules if block_modules is not None else [self.model]
        if self.granularity == "block":
            unit_modules = roots
        else:  # every module that owns a tensor itself, in registration order
            unit_modules = [m for r in roots for m in r.modules() if m._parameters or m._buffers]
        # Slots are keyed by tensor identity so that a tensor shared by two units is onloaded once.
        slots_by_id: dict[int, _Slot] = {}
        units = []
        for module in unit_modules:
            unit_slots = []
            for slot in _collect_slots([module], recurse=self.granularity == "block"):
                shared = slots_by_id.setdefault(slot.identity(), slot)
                shared.owners += [o for o in slot.owners if o not in shared.owners]
                unit_slots.append(shared)
            units.append(_Unit(module, unit_slots))
        arena = _PinnedArena() if pin else None
        for slot in slots_by_id.values():
            slot.make_host_copy(self.offload_device, arena=arena)
        return units

    def _move_resident(self) -> list[_Slot]:
        """Move everything outside the units to the onload device (it stays there)."""
        managed = {(id(m), name) for u in self._units for s in u.slots for m, name, _ in s.owners}
        resident = _collect_slots([self.model], recurse=True, skip=managed)
        for slot in resident:
            slot.attach(slot.current().to(self.onload_device))
        return resident

    def _register_hooks(self) -> list:
        handles = [self.model.register_forward_pre_hook(self._model_pre_forward)]
        for index, unit in enumerate(self._units):
            pre = self._pre_hook(index)
            handles.append(unit.module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(unit.module.register_forward_hook(self._post_hook(index)))
        return handles

    # -- hooks --

    def _model_pre_forward(self, module: nn.Module, args) -> None:
        # Start clean (a previous forward may have raised half-way). Nothing is copied yet: a forward whose
        # blocks are skipped (a step cache reusing its residual) must stream no block.
        self.offload_all()
        self._blocks_started = False

    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args, kwargs):
            if not self._blocks_started:  # the first unit of this forward: copy it and the next ones
                self._blocks_started = True
                for ahead in range(index, min(index + self.prefetch, len(self._units))):
                    self._start_prefetch(ahead)
            self._make_resident(self._units[index])  # waits (on the device) for its prefetch copy
            if self.granularity == "block":
                return None
            # Like accelerate's hooks: inputs may come from modules that live on the offload device.
            return _move_tensors(args, self.onload_device), _move_tensors(kwargs, self.onload_device)

        return hook

    def _post_hook(self, index: int):
        def hook(module: nn.Module, args, output) -> None:
            # This block's kernels are queued. Waiting here for the previous block to finish keeps at most
            # prefetch + 1 blocks on the device without leaving it idle (this block is queued behind it).
            self._wait_released()
            self._release(self._units[index])
            # Copy the next blocks while this one computes.
            for ahead in range(index + 1, min(index + 1 + self.prefetch, len(self._units))):
                self._start_prefetch(ahead)

        return hook

    # -- transfers --

    def _acquire(self, unit: _Unit) -> None:
        for slot in unit.slots:
            slot.refs += 1
            if slot.refs == 1:
                # copy=True: on CPU-as-both-devices this still makes a separate onloaded tensor.
                slot.device_tensor = slot.host.to(self.onload_device, non_blocking=True, copy=True)
                slot.attach(slot.device_tensor)

    def _start_prefetch(self, index: int) -> None:
        unit = self._units[index]
        if unit.state != _OFFLOADED:
            return
        if self._copy_stream is None:
            self._acquire(unit)
        else:
            with self._copy_stream:
                self._acquire(unit)
                unit.copied = self._copy_stream.record_event()
        unit.state = _PENDING
        self.stats.prefetches += 1

    def _make_resident(self, unit: _Unit) -> None:
        if unit.state == _RESIDENT:
            return
        if unit.state == _PENDING and unit.copied is not None:
            compute = torch.accelerator.current_stream(self.onload_device)
            compute.wait_event(unit.copied)
            for slot in unit.slots:
                # Allocated on the copy stream: keep the memory from being reused while compute reads it.
                if slot.device_tensor is not None:
                    slot.device_tensor.record_stream(compute)
            unit.copied = None
        elif unit.state == _OFFLOADED:
            self._acquire(unit)  # synchronous: ordered on the compute stream
        unit.state = _RESIDENT
        self.stats.onloads += 1

    def _release(self, unit: _Unit) -> None:
        if unit.state == _OFFLOADED:
            return
        for slot in unit.slots:
            slot.refs -= 1
            if slot.refs == 0:
                slot.attach(slot.host)
                slot.device_tensor = None
        if self._copy_stream is not None and unit.state == _RESIDENT:
            self._released.append(torch.accelerator.current_stream(self.onload_device).record_event())
        unit.state, unit.copied = _OFFLOADED, None
        self.stats.offloads += 1

    def _wait_released(self) -> None:
        while self._released:
            self._released.pop().synchronize()

    # -- public --

    def is_onloaded(self, module: nn.Module) -> bool:
        """Whether the unit of `module` (a block, or a submodule in sequential mode) is onloaded."""
        unit = next((u for u in self._units if u.module is module), None)
        if unit is None:
            raise ValueError(f"{type(module).__name__} is not a unit of this offloader")
        return unit.state != _OFFLOADED

    @property
    def units(self) -> list[nn.Module]:
        return [u.module for u in self._units]

    def offload_all(self) -> None:
        """Drop every onloaded or prefetched unit (normally the hooks leave none)."""
        busy = [u for u in self._units if u.state != _OFFLOADED]
        if not busy:
            return
        if self._streams:
            torch.accelerator.synchronize(self.onload_device)
        for unit in busy:
            self._release(unit)
        self._released.clear()

    def remove(self) -> None:
        """Take the hooks off and put every tensor back on the device it had before offloading."""
        if not hasattr(self.model, _OFFLOADER_ATTR):
            return
        for handle in self._handles:
            handle.remove()
        self.offload_all()
        managed = {id(s): s for u in self._units for s in u.slots}.values()
        for slot in [*managed, *self._resident]:
            if not _same_device(slot.current().device, slot.original_device):
                slot.attach(slot.current().to(slot.original_device))
        delattr(self.model, _OFFLOADER_ATTR)
        empty_device_cache(self.onload_device)

    def __enter__(self) -> BlockOffloader:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _resolve_blocks(model: nn.Module, blocks: Sequence[str] | None) -> list[nn.Module] | None:
    """The blocks of the named ModuleLists (dotted paths allowed), in execution order."""
    if blocks is None:
        return None
    if isinstance(blocks, str):
        blocks = (blocks,)
    found = []
    for name in blocks:
        try:
            container = model.get_submodule(name)
        except AttributeError:
            container = None
        if not isinstance(container, nn.ModuleList):
            lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
            raise ValueError(
                f"{type(model).__name__} has no nn.ModuleList {name!r}; its ModuleLists: {lists}")
        found.extend(container)
    if not found:
        raise ValueError(f"the block lists {tuple(blocks)} are empty: nothing to offload")
    return found


def enable_block_offload(
    model: nn.Module,
    *,
    onload_device: torch.device | str,
    offload_device: torch.device | str = "cpu",
    blocks: Sequence[str] = DIT_BLOCKS,
    prefetch: int = 1,
    pin_memory: bool = True,
) -> BlockOffloader:
    """Offload the blocks of `model`'s ModuleLists and stream them in one by one, copying ahead.

    The modules outside the block lists move to `onload_device` and stay there. Each block's weights and
    buffers (fp8 weights and their scales included) live on `offload_device` (page-locked when that is the
    CPU and the onload device an accelerator). A forward pre-hook makes the block resident (the compute stream
    waits for its copy); the forward hook, once the block's kernels are queued, drops it and starts copying
    the next `prefetch` blocks on a side stream, so they arrive while this block computes. At most
    prefetch + 1 blocks are on the device at a time.

    Args:
        model: e.g. HYVideoDiffusionTransformer.
        onload_device: where the blocks run. offload_device: where they wait.
        blocks: attribute names (or dotted paths) of nn.ModuleLists, in execution order.
        prefetch: blocks copied ahead of the running one (0: copy synchronously when needed).
        pin_memory: page-lock the host copies (faster, truly asynchronous copies).
    Returns:
        the BlockOffloader; call `.remove()` to undo.
    """
    return BlockOffloader(model, onload_device=onload_device, offload_device=offload_device, blocks=blocks,
                          granularity="block", prefetch=prefetch, pin_memory=pin_memory)


def enable_sequential_offload(
    model: nn.Module,
    *,
    onload_device: torch.device | str,
    offload_device: torch.device | str = "cpu",
    blocks: Sequence[str] | None = None,
    pin_memory: bool = True,
) -> BlockOffloader:
    """Onload every weight-owning submodule just before its forward and drop it after (synchronous).

    With `blocks=None` the whole model is streamed, as the original's `--use-cpu-offload` did to the text
    encoders and the VAE; with block list names only the submodules inside those lists are, the rest stays
    resident on `onload_device`. Tensor inputs of each submodule are moved to `onload_device`.
    """
    return BlockOffloader(model, onload_device=onload_device, offload_device=offload_device, blocks=blocks,
                          granularity="sequential", prefetch=0, pin_memory=pin_memory)
