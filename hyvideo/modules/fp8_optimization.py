"""FP8 weight storage for the DiT: `FP8Linear`, scale maps, quantisation and fp8 checkpoint loading.

HunyuanVideo's `--use-fp8` stores the 320 `nn.Linear` weights of `double_blocks` / `single_blocks` as
float8_e4m3fn with one float scale per layer (a separate "map" file keyed by module name). Activations are
never quantised: each layer dequantises its weight just in time, `W = bf16(w_fp8) * bf16(scale)`, and
runs a normal `F.linear`. fp8 here saves memory (about 12.5 GB of the 25 GB bf16 DiT), not FLOPs.

Files (official release, `ckpts/hunyuan-video-t2v-720p/transformers/`):
* `mp_rank_00_model_states_fp8.pt`: the DiT state dict (flat or under "module"/"ema"), the 320 block-linear
  weights as float8_e4m3fn holding W / scale, every other tensor in bf16;
* `mp_rank_00_model_states_fp8_map.pt`: {module name (no ".weight"): scale tensor}, 320 entries.

Differences from the original (which patched `forward` of each nn.Linear with a lambda):
* a real module swap (`FP8Linear`) with the scale as a (non-persistent) buffer, so `.to(device)` moves it;
* no `weight.sum() != 0` test per call (see `FP8Linear`);
* the checkpoint is checked: the converted weights must really be float8_e4m3fn, and the scale map must name
  exactly the converted layers. The original multiplied a bf16 checkpoint's weights by the scales silently.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import DiTConfig
from .loading import load_dit_state_dict, load_dit_weights
from .models import HIGH_PRECISION_MODULES, HYVideoDiffusionTransformer, is_high_precision_module

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

FP8_DTYPE = torch.float8_e4m3fn
# Largest finite float8_e4m3fn value, 1.75 * 2**8 (the original's get_fp_maxval(8, 3, 1)).
FP8_E4M3_MAX = 448.0
# Top-level submodules whose Linear layers keep the model precision. One tuple, shared with the DiT.
FP8_EXCLUDED: tuple[str, ...] = HIGH_PRECISION_MODULES
# Parity: the original converts every nn.Linear whose qualified name *contains* one of these words.
FP8_BLOCK_WORDS: tuple[str, ...] = ("double_blocks", "single_blocks")
# Dtypes accepted for the stored scales (the original's stored dtype is not visible in its code).
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
_MAP_SUFFIX = "_map.pt"
_MADV_PAGEOUT = 21  # linux/mman.h, Linux >= 5.4 (older kernels answer EINVAL: then nothing happens)


def _examples(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"{len(items)}: {shown}" + (", ..." if len(items) > limit else "")


# --------------------------------------------------------------------------------------------------
# Quantisation math
# --------------------------------------------------------------------------------------------------


def fp8_scale_for(weight: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale max|W| / 448 as a 0-d float32 tensor; 1 for an all-zero weight (no division by 0)."""
    amax = weight.detach().abs().amax().float()
    return torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn(clamp(W / scale, ±448)), computed in float32.

    Rounding: the cast rounds to the nearest E4M3 value, ties to even. That is the grid and the rounding of
    the original's (dead) fake-quant path, `round(x / s) * s` with `s = 2**(max(floor(log2|x|) + 7, 1) - 10)`
    (torch.round also ties to even), so both give the same values. The clamp makes saturation explicit rather
    than relying on the cast's out-of-range behaviour (float32 division can land just above 448).
    """
    scaled = weight.detach().float() / scale.to(device=weight.device, dtype=torch.float32)
    return scaled.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dtype(w_fp8) * dtype(scale), the product taken in `dtype`.

    Parity: the original computes `weight.to(bf16) * fp8_scale.to(bf16)`, a bf16 product (not float32 then
    rounded). The upcast comes first because the CPU cannot multiply fp8 tensors.
    """
    return weight.to(dtype) * scale.to(device=weight.device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


class FP8Linear(nn.Module):
    """A Linear layer with a float8_e4m3fn weight, dequantised with its per-layer scale on every call."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        # A Parameter named `weight`, so the checkpoint key `<name>.weight` loads into it. `model.to(dtype)`
        # would upcast it like any floating tensor and lose the saving: move the model with `.to(device)`.
        weight = torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        # Non-persistent: the official weights file has no scale keys, the scales come from the map file.
        scale = torch.ones((), dtype=torch.float32, device=device)
        self.register_buffer("fp8_scale", scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) in compute_dtype -> (..., out_features)."""
        # The original first tests `weight.sum() != 0` and otherwise runs the plain forward: a guard against
        # a layer left at its zero initialisation (fp8 weights never loaded), paid for with a host-device sync
        # on every call. Here a layer is only filled by a strict, checked load (every converted weight present
        # and float8_e4m3fn), so that case cannot arise; and a truly all-zero weight gives `bias` under both
        # formulas, the scale being finite (checked on load). So no test and no sync.
        weight = dequantize_weight(self.weight, self.fp8_scale, self.compute_dtype)  # (out, in)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}"
        )


# --------------------------------------------------------------------------------------------------
# Which layers
# --------------------------------------------------------------------------------------------------


def is_fp8_layer_name(name: str) -> bool:
    """Whether a Linear called `name` (as in `named_modules()`) is stored in fp8: inside the blocks only."""
    return any(word in name for word in FP8_BLOCK_WORDS) and not is_high_precision_module(name)


def fp8_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers that are (or will be) FP8Linear: nn.Linear / FP8Linear under the DiT blocks."""
    return [
        name for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, FP8Linear)) and is_fp8_layer_name(name)
    ]


def fp8_weight_names(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Module names of the fp8 layers as seen in a state dict: 2-D `<name>.weight` under the DiT blocks.

    Inside the blocks the only other weights are the 1-D q/k RMSNorm weights, so "2-D" means "Linear".
    """
    return [
        key.removesuffix(".weight") for key, tensor in state_dict.items()
        if key.endswith(".weight") and tensor.ndim == 2 and is_fp8_layer_name(key.removesuffix(".weight"))
    ]


# --------------------------------------------------------------------------------------------------
# Scale maps and conversion
# --------------------------------------------------------------------------------------------------


def _is_scalar_scale(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype in _SCALE_DTYPES


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def check_scale_map(scale_map: Mapping[str, object], names: list[str] | None) -> dict[str, torch.Tensor]:
    """Validate `scale_map` against the fp8 layer `names`; return it as {name: 0-d float32 CPU tensor}.

    With `names=None` only the values are checked (every key is taken as a layer name).

    Raises:
        ValueError: a layer without a scale, a map entry naming no fp8 layer, or a scale that is not a finite
            1-element float tensor (float32, bfloat16, float16 or float64).
    """
    if names is None:
        header = f"invalid fp8 scale map ({len(scale_map)} entries):"
        names = [str(k) for k in scale_map]
    else:
        header = f"the fp8 scale map ({len(scale_map)} entries) does not match the {len(names)} fp8 layers:"
    expected = set(names)
    missing = [n for n in names if n not in scale_map]
    extra = [str(k) for k in scale_map if k not in expected]
    bad = [f"{k} ({_describe(v)})" for k, v in scale_map.items() if k in expected and not _is_scalar_scale(v)]
    lines = []
    if missing:
        lines.append(f"  fp8 layers without a scale, {_examples(missing)}")
    if extra:
        lines.append(f"  map entries that name no fp8 layer, {_examples(extra)}")
        if any(k.endswith(".weight") and k.removesuffix(".weight") in expected for k in extra):
            lines.append("  (map keys are module names, without the '.weight' suffix)")
    if bad:
        lines.append(f"  scales that are not 1-element float tensors, {_examples(bad)}")
    if not lines:
        scales = {n: scale_map[n].detach().reshape(()).to(device="cpu", dtype=torch.float32) for n in names}
        not_finite = [n for n, s in scales.items() if not torch.isfinite(s)]
        if not not_finite:
            return scales
        lines.append(f"  scales that are inf or nan, {_examples(not_finite)}")
    raise ValueError("\n".join([header, *lines]))


def convert_fp8_linear(
    model: nn.Module,
    scale_map: Mapping[str, torch.Tensor],
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
) -> list[str]:
    """Replace every nn.Linear under `double_blocks` / `single_blocks` by an FP8Linear, by name, in place.

    On a meta-device model (the normal path, before an assign-load) the new layers are empty meta tensors and
    only the scales are real. On a materialised model the current weights are quantised with the given scales
    (and biases cast to `compute_dtype`), so `convert_fp8_linear(model, quantize_state_dict(sd)[1])` turns a
    loaded model into an fp8 one.

    Args:
        model: the DiT (or any module with the same naming), not yet converted.
        scale_map: {module name: 1-element scale}, exactly one per converted layer.
        compute_dtype: dtype of the dequantised weight, the bias and the matmul: the DiT precision.
        device: where the scale buffers live (default: the layer's device, or the CPU for a meta model).
    Returns:
        The converted module names, in `named_modules()` order.
    Raises:
        ValueError: the model is already converted, or the map does not match (see `check_scale_map`).
    """
    if any(isinstance(m, FP8Linear) for m in model.modules()):
        raise ValueError("the model already has FP8Linear layers: convert_fp8_linear was applied twice")
    names = fp8_layer_names(model)
    scales = check_scale_map(scale_map, names)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear: nn.Linear = getattr(parent, child)
        layer = _fp8_from_linear(linear, scales[name], compute_dtype, device)
        setattr(parent, child, layer)
    logger.info("converted %d Linear layers to FP8Linear (compute dtype %s)", len(names), compute_dtype)
    return names


def _fp8_from_linear(
    linear: nn.Linear, scale: torch.Tensor, compute_dtype: torch.dtype, device: torch.device | str | None
) -> FP8Linear:
    on_meta = linear.weight.is_meta
    home = linear.weight.device
    has_bias = linear.bias is not None
    layer = FP8Linear(
        linear.in_features, linear.out_features, has_bias, compute_dtype=compute_dtype, device=home
    )
    scale_device = device if device is not None else ("cpu" if on_meta else home)
    layer.fp8_scale = scale.to(scale_device)
    if not on_meta:
        with torch.no_grad():
            layer.weight.copy_(quantize_weight(linear.weight, scale))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
    return layer


# --------------------------------------------------------------------------------------------------
# Quantising a state dict (the conversion tool's core)
# --------------------------------------------------------------------------------------------------


def _page_out(tensor: torch.Tensor) -> None:
    """Ask the kernel to reclaim a CPU tensor's whole pages now (Linux MADV_PAGEOUT; best effort).

    For a memory-mapped checkpoint this drops the file pages just read, so quantising at load never holds
    the bf16 model and its fp8 copy together. Safe on any memory: clean file pages are re-read on access,
    anonymous pages go to swap or stay (never zeroed, unlike MADV_DONTNEED). No-op off Linux.
    """
    if sys.platform != "linux" or tensor.device.type != "cpu":
        return
    start, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:  # whole pages only: a page shared with a neighbouring tensor stays
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, names: list[str] | None = None, page_out: bool = False
) -> tuple[StateDict, dict[str, torch.Tensor]]:
    """Quantise the block-linear weights of a (bf16/fp32) DiT state dict to the official fp8 format.

    Layer by layer, so only one layer's float32 temporaries exist at a time; other tensors pass through as
    they are (same objects, dtypes as stored: biases stay bf16 like the official file).

    Args:
        state_dict: official-key DiT state dict.
        names: module names to quantise (default `fp8_weight_names(state_dict)`, the 320 at full size).
        page_out: after each layer, let the kernel reclaim the source weight's pages (`_page_out`): for a
            memory-mapped source, peak memory is then the fp8 output plus one layer, not plus the input.
    Returns:
        (fp8_state_dict, scale_map): the state dict with `<name>.weight` as float8_e4m3fn W/scale, and
        {name: 0-d float32 scale}. The scales are stored as float32: exact for max|W| / 448, and the loader
        casts them to the compute dtype (as the original does) so a bf16 map would load the same.
    Raises:
        ValueError: a named weight is missing, not 2-D, or already fp8.
    """
    names = fp8_weight_names(state_dict) if names is None else list(names)
    keys = [f"{name}.weight" for name in names]
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"quantize_state_dict: weights not in the state dict, {_examples(missing)}")
    already = [k for k in keys if state_dict[k].dtype in _FP8_DTYPES]
    if already:
        raise ValueError(f"quantize_state_dict: weights already fp8, {_examples(already)}")
    out: StateDict = dict(state_dict)
    scale_map: dict[str, torch.Tensor] = {}
    for name, key in zip(names, keys):
        weight = state_dict[key]
        if weight.ndim != 2:
            raise ValueError(f"quantize_state_dict: {key} has shape {list(weight.shape)}, expected 2-D")
        scale = fp8_scale_for(weight)
        out[key] = quantize_weight(weight, scale)
        scale_map[name] = scale
        if page_out:
            _page_out(weight)
    return out, scale_map


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def fp8_map_path(weights_path: str | os.PathLike) -> Path:
    """The scale map next to an fp8 weights file: the file name's trailing ".pt" becomes "_map.pt".

    Parity: same naming as the original (`..._fp8.pt` -> `..._fp8_map.pt`), which however ran
    `str.replace('.pt', '_map.pt')` on the whole path and so also rewrote directories such as `foo.pt.d/`.
    """
    path = Path(weights_path)
    if not path.name.endswith(".pt"):
        raise ValueError(
            f"cannot derive the fp8 scale map path from {path}: the file name does not end in '.pt'; "
            "pass the map path explicitly"
        )
    return path.with_name(path.name[: -len(".pt")] + _MAP_SUFFIX)


def _read_scale_map(path: Path) -> Mapping[str, object]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        raise ValueError(f"could not read the fp8 scale map {path}: {err}") from err
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{path} is not an fp8 scale map (expected a dict {{module name: scale tensor}})")
    return obj


def _check_fp8_weights(state_dict: Mapping[str, torch.Tensor], names: list[str], path: Path) -> None:
    """The scaled layers must hold float8_e4m3fn weights, and no other tensor may be fp8."""
    wanted = {f"{n}.weight" for n in names}
    not_fp8 = [f"{k} ({state_dict[k].dtype})" for k in sorted(wanted) if k in state_dict
               and state_dict[k].dtype != FP8_DTYPE]
    if not_fp8:
        raise ValueError(
            f"{path} is not an fp8 checkpoint: layers listed in the scale map must hold float8_e4m3fn "
            f"weights, but {_examples(not_fp8)}. Load bf16 weights without --use-fp8, or convert them "
            "first with scripts/convert_to_fp8.py."
        )
    stray = [f"{k} ({t.dtype})" for k, t in state_dict.items() if t.dtype in _FP8_DTYPES and k not in wanted]
    if stray:
        raise ValueError(
            f"{path} has fp8 tensors that have no scale in the map, {_examples(stray)}; the map lacks "
            "entries, or the checkpoint stores a layer in fp8 that must stay in high precision"
        )


def load_fp8_checkpoint(
    weights_path: str | os.PathLike,
    map_path: str | os.PathLike | None = None,
    *,
    load_key: str = "module",
    layer_names: list[str] | None = None,
) -> tuple[StateDict, dict[str, torch.Tensor]]:
    """Read an fp8 DiT checkpoint and its scale map (tensors stay memory-mapped, on the CPU, as stored).

    Args:
        weights_path: the fp8 weights *file*, e.g. `.../transformers/mp_rank_00_model_states_fp8.pt` (flat, or
            wrapped under "module"/"ema" like the official release).
        map_path: the scale map; default `fp8_map_path(weights_path)` (`..._fp8_map.pt`).
        load_key: which entry of a wrapped checkpoint to use ("module" or "ema").
        layer_names: the model's fp8 layers (`fp8_layer_names(model)`); when given, the map must name exactly
            these, checked before the weights are read.
    Returns:
        (state_dict, scale_map): official keys with the block-linear weights as float8_e4m3fn, and
        {module name: 0-d float32 scale}.
    Raises:
        FileNotFoundError: the weights file or the map does not exist.
        ValueError: not a file, unreadable, a malformed map, or weights that are not float8_e4m3fn.
    """
    path = Path(weights_path)
    if not path.exists():
        raise FileNotFoundError(f"fp8 DiT weights {path} do not exist")
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory: --use-fp8 needs the fp8 weights file itself, e.g. "
            f"{path / 'mp_rank_00_model_states_fp8.pt'}"
        )
    map_file = Path(map_path) if map_path is not None else fp8_map_path(path)
    if not map_file.is_file():
        raise FileNotFoundError(
            f"fp8 scale map {map_file} does not exist (expected next to {path.name}, named like it with "
            "'_map.pt'); the release ships it as mp_rank_00_model_states_fp8_map.pt"
        )
    scale_map = check_scale_map(_read_scale_map(map_file), layer_names)
    state_dict = load_dit_state_dict(path, load_key)
    _check_fp8_weights(state_dict, list(scale_map), path)
    return state_dict, scale_map


def read_or_quantize_fp8(
    weights_path: str | os.PathLike, map_path: str | os.PathLike | None, load_key: str, layer_names: list[str]
) -> tuple[StateDict, dict[str, torch.Tensor]]:
    """The fp8 pair as `load_fp8_checkpoint` reads it, or, for high-precision weights without a scale map,
    the same format quantised now with the conversion script's rule (`quantize_state_dict`).

    Quantising streams: the source is memory-mapped and converted one layer at a time, each layer's source
    pages handed back to the kernel, so the bf16 model and its fp8 copy never sit in memory together.
    """
    path = Path(weights_path)
    has_map = path.is_file() and path.name.endswith(".pt") and fp8_map_path(path).is_file()
    if map_path is None and not has_map and path.exists():
        state_dict = load_dit_state_dict(path, load_key)
        weights = [state_dict.get(f"{name}.weight") for name in layer_names]
        if all(w is not None and w.dtype.is_floating_point and w.dtype not in _FP8_DTYPES for w in weights):
            logger.info("--use-fp8 with %s weights and no scale map: quantising %d layers to fp8 at load "
                        "(scripts/convert_to_fp8.py writes the same pair to disk once)", weights[0].dtype,
                        len(layer_names))
            return quantize_state_dict(state_dict, names=layer_names, page_out=True)
    return load_fp8_checkpoint(path, map_path, load_key=load_key, layer_names=layer_names)


def load_fp8_dit(
    config: DiTConfig,
    weights_path: str | os.PathLike,
    *,
    map_path: str | os.PathLike | None = None,
    load_key: str = "module",
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str | None = None,
    attention_backend: str = "auto",
) -> HYVideoDiffusionTransformer:
    """Build the DiT on the meta device, convert its block linears to FP8Linear, assign the fp8 checkpoint.

    `weights_path` may also be a bf16 / fp32 checkpoint without a scale map: it is quantised at load, layer
    by layer, with the same rule as scripts/convert_to_fp8.py (see `read_or_quantize_fp8`).

    The model never exists twice: fp8 weights are assigned as they are (memory-mapped on the CPU, or copied
    once to `device`), the other tensors are cast to `dtype` (FinalLayer.linear stays float32).

    Args:
        config: architecture (e.g. HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"]).
        weights_path, map_path, load_key: see `load_fp8_checkpoint`.
        dtype: the DiT precision and the FP8Linear compute dtype (None = float32).
        device: where the model goes (default CPU).
        attention_backend: "auto", "flash", "sdpa", "vanilla" or a registered name.
    Returns:
        The model in eval mode.
    """
    backend = attention_backend
    model = HYVideoDiffusionTransformer(config, dtype=dtype, device="meta", attention_backend=backend)
    state_dict, scale_map = read_or_quantize_fp8(weights_path, map_path, load_key, fp8_layer_names(model))
    target = device if device is not None else "cpu"
    convert_fp8_linear(model, scale_map, compute_dtype=dtype or torch.float32, device=target)
    load_dit_weights(model, state_dict, device=target)
    logger.info("loaded fp8 DiT weights from %s (%d tensors, %d fp8)", weights_path, len(state_dict),
                len(scale_map))
    return model.eval()
