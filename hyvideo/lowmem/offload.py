"""Keeping big models off the accelerator until they are needed.

Three tools, from coarse to fine:

* `on_device(module, device)`: a context manager that moves a whole model in for one stage (text encoding,
  denoising, decoding) and puts it back afterwards, so that only one big model occupies the accelerator.
* `enable_block_offload(model, ...)`: the repeated blocks of a model (the DiT's `double_blocks` and
  `single_blocks`) stay on the offload device (page-locked CPU memory) and each block is copied in just before
  it runs while the next one is copied on a side stream; the small rest of the model stays resident.
* `enable_sequential_offload(model, ...)`: every submodule that owns weights is copied in just before its own
  forward and dropped after it, synchronously. This is what the original's `--use-cpu-offload` did to the text
  encoders and the VAE (diffusers' `enable_sequential_cpu_offload`); it is slow and kept for comparison.

`apply_offload` combines them for the four pipeline components according to one of `OFFLOAD_MODES`.

Weights are never copied back: inference does not change them, so dropping a block only points its
parameters back at the host copy that was kept (`param.data = host`). This assumes nothing writes to the
weights or buffers of offloaded modules while they are onloaded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hyvideo.lowmem.block_offload import (  # noqa: F401 - re-exported: the offload API lives in one namespace
    DIT_BLOCKS,
    GRANULARITIES,
    BlockOffloader,
    OffloadStats,
    _collect_slots,
    _module_tensors,
    _same_device,
    empty_device_cache,
    enable_block_offload,
    enable_sequential_offload,
    execution_device,
    has_offload_hooks,
    normalize_device,
)

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "model", "block", "sequential")
TRANSFORMER = "transformer"

# -------- Model-level moves -----------------------------------------------------------------------


@contextlib.contextmanager
def on_device(
    module: nn.Module | None,
    device: torch.device | str,
    *,
    offload_device: torch.device | str = "cpu",
    enabled: bool = True,
) -> Iterator[nn.Module | None]:
    """Move `module` onto `device` for the duration of the block, then back to `offload_device`.

    No-op when disabled, when `module` is None, or when every weight is already on `device` (it then stays
    there afterwards). On exit the parameters and buffers point at their host copies again (no copy back) and
    the accelerator's cache is emptied, so the next model finds the memory free.

    Args:
        module: the model to move (a text encoder, the DiT or the VAE).
        device: where it runs. offload_device: where it waits.
        enabled: False turns the context manager into a no-op (for "no offload" runs).
    """
    device = normalize_device(device)
    if not enabled or module is None or all(_same_device(t.device, device) for t in _module_tensors(module)):
        yield module
        return
    if has_offload_hooks(module):
        raise ValueError(
            f"{type(module).__name__} has block/sequential offload hooks: on_device would load all of its "
            "blocks; remove the offloader first (handle.remove()) or leave the module to its hooks"
        )
    slots = _collect_slots([module], recurse=True)
    offload_device = normalize_device(offload_device)
    for slot in slots:
        source = slot.current()
        slot.make_host_copy(offload_device)
        slot.attach(source if _same_device(source.device, device) else slot.host.to(device))
    try:
        yield module
    finally:
        for slot in slots:
            slot.attach(slot.host)
        empty_device_cache(device)


# -------- Pipeline-level plan ---------------------------------------------------------------------


@dataclass
class OffloadPlan:
    """Where the pipeline components live under one offload mode; `stage()` brings a stage's models in."""

    mode: str
    device: torch.device
    offload_device: torch.device
    components: dict[str, nn.Module | None]
    staged: frozenset[str] = frozenset()
    offloaders: dict[str, BlockOffloader] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, *names: str) -> Iterator[None]:
        """Make the named components usable on `device` for the duration of the block.

        Components under model-level offload are moved in and back out; resident or hook-managed ones are
        left alone. Example: `with plan.stage("text_encoder", "text_encoder_2"): encode(...)`.
        """
        unknown = [n for n in names if n not in self.components]
        if unknown:
            raise ValueError(f"unknown components {unknown}; this plan has {sorted(self.components)}")
        with contextlib.ExitStack() as stack:
            for name in names:
                stack.enter_context(on_device(self.components[name], self.device, enabled=name in self.staged,
                                              offload_device=self.offload_device))
            yield

    def execution_device(self, name: str) -> torch.device:
        """The device a component computes on, whatever device its weights wait on."""
        if name not in self.components:
            raise ValueError(f"unknown component {name!r}; this plan has {sorted(self.components)}")
        return self.device

    def forget(self, *names: str) -> None:
        """Drop the named components for good: the plan stops holding them and their offloaders (with any
        page-locked host copies), without moving anything back. Their stages become no-ops."""
        for name in names:
            self.components[name] = None
            self.offloaders.pop(name, None)

    def remove(self) -> None:
        """Take every offload hook off (each model goes back to where it was when the plan was made)."""
        for offloader in self.offloaders.values():
            offloader.remove()
        self.offloaders.clear()


# The LLM text encoder (hyvideo.text_encoder.TextEncoder wrapping a LlamaModel) and its decoder layers.
TEXT_ENCODER = "text_encoder"
LLM_BLOCKS: tuple[str, ...] = ("model.layers",)


def _has_module_list(module: nn.Module, names: Sequence[str]) -> bool:
    try:
        return all(isinstance(module.get_submodule(name), nn.ModuleList) for name in names)
    except AttributeError:
        return False


def apply_offload(
    components: Mapping[str, nn.Module | None],
    *,
    mode: str,
    device: torch.device | str,
    offload_device: torch.device | str = "cpu",
    transformer: str = TRANSFORMER,
    blocks: Sequence[str] = DIT_BLOCKS,
    prefetch: int = 1,
    pin_memory: bool = True,
) -> OffloadPlan:
    """Place the pipeline components for one offload mode and return the plan the pipeline follows.

    Modes (`OFFLOAD_MODES`):
        none:       every component on `device` all the time (fastest; ~70 GiB at 720p).
        model:      every component waits on `offload_device` and is moved in for its stage only.
        block:      like "model" for the CLIP encoder and the VAE; the DiT's blocks, and the LLM's decoder
                    layers, stream in with prefetch while their small remainders stay on `device`.
                    Our meaning of `--use-cpu-offload`.
        sequential: the original's `--use-cpu-offload`: the DiT stays resident, the other components are
                    streamed submodule by submodule on every forward (slow, kept for comparison).

    Args:
        components: name -> module, e.g. {"text_encoder": llm, "text_encoder_2": clip, "transformer": dit,
            "vae": vae}; None entries are skipped.
        transformer: the name of the DiT among `components`.
        blocks, prefetch, pin_memory: as in `enable_block_offload` (used by mode "block").
    Returns:
        an OffloadPlan; wrap each stage in `plan.stage(names...)`.
    """
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload mode must be one of {OFFLOAD_MODES}, got {mode!r}")
    device, offload_device = normalize_device(device), normalize_device(offload_device)
    present = {name: module for name, module in components.items() if module is not None}
    if mode in ("block", "sequential") and transformer not in present:
        raise ValueError(f"mode {mode!r} needs the DiT among the components under the name {transformer!r}")
    plan = OffloadPlan(mode, device, offload_device, dict(components))
    if mode == "none":
        for module in present.values():
            module.to(device)
        return plan
    if mode == "sequential":
        present[transformer].to(device)
        for name, module in present.items():
            if name != transformer:
                plan.offloaders[name] = enable_sequential_offload(
                    module, onload_device=device, offload_device=offload_device, pin_memory=pin_memory)
        return plan
    staged = set(present)
    if mode == "block":
        staged.discard(transformer)
        plan.offloaders[transformer] = enable_block_offload(
            present[transformer], onload_device=device, offload_device=offload_device, blocks=blocks,
            prefetch=prefetch, pin_memory=pin_memory)
        llm = present.get(TEXT_ENCODER)
        if llm is not None and _has_module_list(llm, LLM_BLOCKS):
            # The LLM's decoder layers stream like the DiT's blocks: encoding then needs its embedding
            # table (~1 GiB, resident) and two layers (~0.4 GiB each in fp16) instead of the whole 15 GB.
            staged.discard(TEXT_ENCODER)
            plan.offloaders[TEXT_ENCODER] = enable_block_offload(
                llm, onload_device=device, offload_device=offload_device, blocks=LLM_BLOCKS,
                prefetch=prefetch, pin_memory=pin_memory)
    for name in staged:
        present[name].to(offload_device)
    plan.staged = frozenset(staged)
    empty_device_cache(device)
    return plan
