"""Applying LoRAs to a loaded HunyuanVideo DiT: several at once, each with its own scale, removable.

`LoraStack(model)` owns every change LoRAs make to the model; the sampler holds one and calls it between
prompts (`add`, `remove`, `set_scale`, `clear`), never during a forward. Each touched layer gets the sum
of the active LoRAs, `delta = sum_i scale_i * factor_i * B_i @ A_i`, in one of two ways:

* merged (bf16 / fp16 / fp32 weights): `W <- cast(float32(W) + delta)`, written in place into the weight
  tensor wherever it lives (accelerator, or the page-locked host copy of a block-offloaded layer), so the
  forward costs nothing extra. The delta is computed on `device` (the accelerator when there is one).
* side path (fp8 weights, `--use-fp8`): the fp8 weight is left alone (re-quantising would lose the LoRA
  in rounding) and a forward hook adds `x @ A_cat^T @ B_cat^T` to the layer's output, where A_cat stacks
  every active A and B_cat holds every scaled B in its rows; cost: two thin matmuls per layer.

Restoring a merged layer is bit-exact without a full copy of the weight: the delta is recomputed from the
kept low-rank factors (same device, same operations) and subtracted, and the few elements where
`cast(float32(W') - delta)` does not round back to the original (about 1% for typical LoRAs; measured in
docs/benchmarks.md) are stored as (index, value) pairs at merge time. When that would cost more than a copy
of the weight (very large deltas), a copy is kept instead.

Block offload: merged weights land in the host copy; side-path factors are stored where the layer's weight
waits (host memory, page-locked when an accelerator is present) and are copied to the input's device by
the hook, so they travel with their block. Sequence parallelism: every rank applies the same LoRAs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lora_files import LoraWeights, lora_layers

logger = logging.getLogger(__name__)

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def uses_side_path(layer: nn.Module) -> bool:
    """Whether a LoRA on `layer` runs beside it (fp8 weight) instead of being merged into its weight."""
    return layer.weight.dtype in _FP8_DTYPES


def check_scale(scale: float, what: str = "LoRA scale") -> float:
    """`scale` as a float; ValueError for nan, inf or a non-number."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {scale!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {scale!r}")
    return value


# -------- The low-rank factors of a layer --------------------------------------------------------


def stacked_factors(
    entries: Iterable[tuple[LoraWeights, float]], module: str, out_features: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A_cat (R, in), B_cat (out, R)), float32 on the CPU, with B_cat @ A_cat = the layer's delta.

    Each piece's B is scaled by its LoRA's scale and alpha factor and written into its rows (a diffusers
    q/k/v piece fills one third); None when no active LoRA touches the layer.
    """
    downs, ups = [], []
    for weights, scale in entries:
        for piece in weights.pieces.get(module, ()):
            up = piece.up * (scale * piece.factor)
            if piece.rows is not None:
                up = torch.zeros(out_features, up.shape[1]).index_copy_(0, piece.rows, up)
            downs.append(piece.down)
            ups.append(up)
    if not downs:
        return None
    return torch.cat(downs, dim=0), torch.cat(ups, dim=1)


def low_rank_delta(down: torch.Tensor, up: torch.Tensor, device: torch.device) -> torch.Tensor:
    """B @ A in float32 on `device`: (out, in)."""
    return up.to(device, torch.float32) @ down.to(device, torch.float32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.element_size()])


# -------- Merged layers ---------------------------------------------------------------------------


@dataclass
class _MergedLayer:
    """What undoing one merge needs: the factors, where they were multiplied, and the exceptions."""

    down: torch.Tensor
    up: torch.Tensor
    device: torch.device
    fix_index: torch.Tensor | None  # flat indices where recomputation does not round back (CPU)
    fix_value: torch.Tensor | None  # the original values there (CPU)
    original: torch.Tensor | None = None  # a whole copy instead, when cheaper than the exceptions


def merge_layer(layer: nn.Module, down: torch.Tensor, up: torch.Tensor, device: torch.device) -> _MergedLayer:
    """W <- cast(float32(W) + B @ A) in place; returns what `unmerge_layer` needs to restore W exactly."""
    weight = layer.weight.data
    original = weight.to(device)
    delta = low_rank_delta(down, up, device)
    merged = (original.float() + delta).to(weight.dtype)
    recovered = (merged.float() - delta).to(weight.dtype)
    wrong = (_bits(recovered) != _bits(original)).flatten().nonzero().flatten()
    index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    index_size = torch.empty((), dtype=index_dtype).element_size()
    # An exception costs an index and a value; a copy costs one value per element.
    if wrong.numel() * (index_size + weight.element_size()) < weight.numel() * weight.element_size():
        record = _MergedLayer(down, up, device, wrong.to("cpu", index_dtype), original.flatten()[wrong].cpu())
    else:
        record = _MergedLayer(down, up, device, None, None, original=original.to("cpu", copy=True))
    weight.copy_(merged)
    return record


def unmerge_layer(layer: nn.Module, record: _MergedLayer) -> None:
    """Put back the exact weight that `merge_layer` found."""
    weight = layer.weight.data
    if record.original is not None:
        weight.copy_(record.original)
        return
    delta = low_rank_delta(record.down, record.up, record.device)
    restored = (weight.to(record.device).float() - delta).to(weight.dtype)
    flat = restored.view(-1)
    flat[record.fix_index.to(flat.device, torch.int64)] = record.fix_value.to(flat.device)
    weight.copy_(restored)


def exception_bytes(record: _MergedLayer) -> int:
    """Host bytes kept to restore one merged layer exactly (besides its low-rank factors)."""
    if record.original is not None:
        return record.original.numel() * record.original.element_size()
    index, value = record.fix_index, record.fix_value
    return index.numel() * index.element_size() + value.numel() * value.element_size()


# -------- Side path (fp8 layers) ------------------------------------------------------------------


def _side_path_hook(down: torch.Tensor, up: torch.Tensor):
    def add_low_rank(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (..., in)
        a = down.to(device=x.device, dtype=x.dtype, non_blocking=True)  # (R, in)
        b = up.to(device=x.device, dtype=x.dtype, non_blocking=True)  # (out, R)
        return output + F.linear(F.linear(x, a), b).to(output.dtype)  # (..., out)

    return add_low_rank


def _side_path_home(layer: nn.Module, model_is_streamed: bool, device: torch.device) -> torch.device:
    """Where side-path factors wait: with a streamed (offloaded) layer's weight on the host, else `device`."""
    if not model_is_streamed:
        return device
    return layer.weight.device


def install_side_path(layer: nn.Module, down: torch.Tensor, up: torch.Tensor, home: torch.device):
    """Register the hook that adds x @ A^T @ B^T to `layer`'s output; returns its removable handle."""
    dtype = getattr(layer, "compute_dtype", None) or torch.float32
    down, up = down.to(home, dtype), up.to(home, dtype)
    if home.type == "cpu" and torch.accelerator.is_available():
        down, up = down.pin_memory(), up.pin_memory()  # asynchronous copies when the block streams in
    return layer.register_forward_hook(_side_path_hook(down, up))


# -------- The stack -------------------------------------------------------------------------------


@dataclass
class _Entry:
    weights: LoraWeights
    scale: float


class LoraStack:
    """The LoRAs applied to one DiT, in load order; every change re-applies the touched layers."""

    def __init__(self, model: nn.Module, *, device: torch.device | str | None = None) -> None:
        self.model = model
        self.layers = lora_layers(model)
        first = next(iter(self.layers.values()))
        self.device = torch.device(device) if device is not None else first.weight.device
        self.entries: dict[str, _Entry] = {}
        self._merged: dict[str, _MergedLayer] = {}
        self._hooks: dict[str, object] = {}

    # -- public --

    def add(self, weights: LoraWeights, scale: float = 1.0) -> None:
        """Apply `weights` at `scale` on top of the LoRAs already applied."""
        scale = check_scale(scale, f"scale of LoRA {weights.name}")
        if weights.name in self.entries:
            raise ValueError(f"a LoRA named {weights.name!r} is already loaded: give another name, or "
                             "unload it first")
        missing = [m for m in weights.pieces if m not in self.layers]
        if missing:
            raise ValueError(f"LoRA {weights.name} targets layers this model lacks: {missing[:4]}")
        self.entries[weights.name] = _Entry(weights, scale)
        self._reapply(weights.pieces)

    def set_scale(self, name: str, scale: float) -> None:
        scale = check_scale(scale, f"scale of LoRA {name}")
        entry = self._entry(name)
        entry.scale = scale
        self._reapply(entry.weights.pieces)

    def remove(self, name: str) -> None:
        entry = self.entries.pop(self._entry(name).weights.name)
        self._reapply(entry.weights.pieces)

    def clear(self) -> None:
        """Remove every LoRA: every touched weight is back to its exact original bits."""
        touched = set(self._merged) | set(self._hooks)
        self.entries.clear()
        self._reapply(touched)

    def records(self) -> list[dict]:
        """For the sidecar: each LoRA's name, file, sha256, layout and scale, in load order."""
        return [{**e.weights.record(), "scale": e.scale} for e in self.entries.values()]

    def restore_bytes(self) -> int:
        """Host bytes held to undo the merges exactly (exceptions or copies; factors not counted)."""
        return sum(exception_bytes(r) for r in self._merged.values())

    # -- internals --

    def _entry(self, name: str) -> _Entry:
        if name not in self.entries:
            loaded = ", ".join(self.entries) or "none"
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
        return self.entries[name]

    @torch.no_grad()
    def _reapply(self, modules: Iterable[str]) -> None:
        active = [(e.weights, e.scale) for e in self.entries.values() if e.scale != 0.0]
        streamed = _is_streamed(self.model)
        for module in sorted(set(modules)):
            layer = self.layers[module]
            if module in self._merged:
                unmerge_layer(layer, self._merged.pop(module))
            if module in self._hooks:
                self._hooks.pop(module).remove()
            factors = stacked_factors(active, module, layer.out_features)
            if factors is None:
                continue
            if uses_side_path(layer):
                home = _side_path_home(layer, streamed, self.device)
                self._hooks[module] = install_side_path(layer, *factors, home)
            else:
                self._merged[module] = merge_layer(layer, *factors, self.device)


def _is_streamed(model: nn.Module) -> bool:
    from hyvideo.lowmem.block_offload import has_offload_hooks

    return has_offload_hooks(model)
