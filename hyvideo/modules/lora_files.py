"""Reading LoRA files for the HunyuanVideo DiT in the three key layouts people share them in.

A LoRA changes a Linear layer's weight by `scale * factor * B @ A` (A: "down", [rank, in]; B: "up",
[out, rank]). The layouts differ only in how they name the layer and the two factors:

1. diffusers / PEFT: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, `...lora_B.weight`, optional
   `.alpha`. diffusers splits our fused projections (img/txt qkv, single-block `linear1`), so each of its
   layers maps onto a row slice of one of ours (the final layer's modulation onto its halves swapped).
2. original names: `diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight` (or the `transformer.` prefix,
   or none), as musubi-tuner and ComfyUI export them.
3. kohya: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `.lora_up.weight` / `.alpha`, the
   module path with '.' written as '_' (HunyuanVideo-I2V's effect LoRAs use the prefix
   `Hunyuan_video_I2V_lora_`). diffusers names written that way are accepted too.

`factor` is alpha / rank when the file stores an alpha and 1 otherwise; `ignore_alpha=True` always uses 1
(Parity: HunyuanVideo-I2V's own loader ignores the alpha of its effect LoRAs).

Only safetensors files are read: a .pt/.ckpt file is a pickle, which can run code when loaded, and LoRAs are
files downloaded from strangers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .loading import diffusers_names_of

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
# Prefixes in front of the module path (longest first): the dotted layouts, then kohya's.
DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
KOHYA_PREFIXES = ("Hunyuan_video_I2V_lora_", "lora_transformer_", "lora_unet_")
# <module>.<factor>[.<PEFT adapter name>].weight, and <module>.alpha
_FACTOR_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<factor>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)(?:\.[\w-]+)?\.weight$"
)
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
_DOWN = ("lora_A", "lora_down", "lora.down")


@dataclass(frozen=True)
class LoraTarget:
    """Where a layer name of some layout lands in our DiT: a Linear and the rows of its weight."""

    module: str  # our (official) module name, e.g. "double_blocks.0.img_attn_qkv"
    layout: str  # "diffusers", "original" or "kohya"
    kind: str = "copy"  # "copy", "qkv", "linear1" or "swap" (see loading.diffusers_names_of)
    part: int = 0


@dataclass
class LoraPiece:
    """One low-rank update of (some rows of) one of our Linear layers."""

    down: torch.Tensor  # A (rank, in_features), float32
    up: torch.Tensor  # B (len(rows) or out_features, rank), float32
    factor: float  # alpha / rank, or 1
    rows: torch.Tensor | None  # int64 indices of the weight rows B writes (diffusers order), None = all


@dataclass
class LoraWeights:
    """A parsed LoRA file: its pieces by our module name, and where it came from."""

    name: str
    path: Path
    sha256: str
    layout: str
    pieces: dict[str, list[LoraPiece]] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(p.down.numel() + p.up.numel() for ps in self.pieces.values() for p in ps)

    def record(self) -> dict:
        """What a sidecar says about this file."""
        return {"name": self.name, "file": self.path.name, "sha256": self.sha256, "layout": self.layout}


# -------- Layer names of every layout ------------------------------------------------------------


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a LoRA may target: every 2-D-weight Linear (nn.Linear, FP8Linear) of the DiT, by name."""
    return {
        name: module for name, module in model.named_modules()
        if hasattr(module, "in_features") and hasattr(module, "out_features")
        and getattr(module, "weight", None) is not None and module.weight.ndim == 2
    }


def target_table(model: nn.Module) -> dict[str, LoraTarget]:
    """Every accepted spelling of every LoRA-able layer -> its target (works on a meta-device model)."""
    table: dict[str, LoraTarget] = {}
    for name in lora_layers(model):
        table[name] = LoraTarget(name, "original")
        table[name.replace(".", "_")] = LoraTarget(name, "kohya")
        rule = diffusers_names_of(name)
        if rule is None:
            continue
        kind, diffusers_names = rule
        for part, diffusers_name in enumerate(diffusers_names):
            table.setdefault(diffusers_name, LoraTarget(name, "diffusers", kind, part))
            table.setdefault(diffusers_name.replace(".", "_"), LoraTarget(name, "kohya", kind, part))
    return table


def target_rows(target: LoraTarget, out_features: int, hidden_size: int) -> torch.Tensor | None:
    """Rows of our fused weight that a diffusers layer's B writes, in B's row order (None: all rows)."""
    if target.kind == "copy":
        return None
    if target.kind == "qkv":
        size = out_features // 3
        return torch.arange(target.part * size, (target.part + 1) * size)
    if target.kind == "linear1":  # rows [q, k, v, mlp] = [H, H, H, out - 3H]
        start = target.part * hidden_size
        stop = out_features if target.part == 3 else start + hidden_size
        return torch.arange(start, stop)
    # "swap". Parity: diffusers stores the final modulation as (scale, shift), we as (shift, scale).
    half = out_features // 2
    return (torch.arange(out_features) + half) % out_features


def _strip_prefix(module: str) -> str:
    for prefix in (*DOTTED_PREFIXES, *KOHYA_PREFIXES):
        if module.startswith(prefix):
            return module[len(prefix):]
    return module


# -------- Reading ---------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_lora_path(path: str | os.PathLike) -> Path:
    """The path as a Path if it names a readable safetensors file; else FileNotFoundError / ValueError."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"LoRA {path}: {path.suffix} files are pickles, which can run code when loaded, so they are "
            "refused; use the .safetensors version of this LoRA (or convert it on a machine you trust)"
        )
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"LoRA {path} is not a file: give the .safetensors file itself")
    return path


def read_lora_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors LoRA file, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = check_lora_path(path)
    try:
        state_dict = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"LoRA {path} is not a readable safetensors file ({exc})") from None
    if not state_dict:
        raise ValueError(f"LoRA {path} holds no tensors")
    return state_dict


# -------- Parsing ---------------------------------------------------------------------------------


def _examples(items: list[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _group_keys(state_dict: dict[str, torch.Tensor], where: str) -> tuple[dict[str, dict], list[str]]:
    """{module spelling: {"down", "up", "alpha"}} and the keys that are no LoRA factor at all."""
    groups: dict[str, dict] = {}
    stray = []
    for key, tensor in state_dict.items():
        if (match := _FACTOR_KEY.match(key)) is not None:
            role = "down" if match["factor"] in _DOWN else "up"
        elif (match := _ALPHA_KEY.match(key)) is not None:
            role = "alpha"
        else:
            stray.append(key)
            continue
        group = groups.setdefault(match["module"], {})
        if role in group:
            raise ValueError(f"{where}: two {role} tensors for {match['module']}")
        group[role] = tensor
    return groups, stray


def _factor(group: dict, rank: int, ignore_alpha: bool, where: str, module: str) -> float:
    alpha = group.get("alpha")
    if alpha is None or ignore_alpha:
        return 1.0
    if alpha.numel() != 1 or not torch.isfinite(alpha.float()).all():
        raise ValueError(f"{where}: the alpha of {module} is not one finite number")
    return float(alpha) / rank


def _piece(group: dict, layer: nn.Module, rows: torch.Tensor | None, factor: float, where: str,
           module: str, target: str) -> LoraPiece:
    down, up = group["down"], group["up"]
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise ValueError(f"{where}: {module} has factors of shapes {list(down.shape)} and {list(up.shape)}, "
                         "which are not a low-rank pair [rank, in] / [out, rank]")
    out_rows = layer.out_features if rows is None else len(rows)
    if down.shape[1] != layer.in_features or up.shape[0] != out_rows:
        raise ValueError(
            f"{where}: the LoRA for layer {target} does not fit: it maps {down.shape[1]} -> {up.shape[0]} "
            f"features, the layer {layer.in_features} -> {out_rows}; the LoRA is for another model size"
        )
    down, up = down.float(), up.float()
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise ValueError(f"{where}: the LoRA for {module} holds inf or nan values")
    return LoraPiece(down, up, factor, rows)


def parse_lora(
    state_dict: dict[str, torch.Tensor],
    model: nn.Module,
    *,
    where: str = "LoRA",
    ignore_alpha: bool = False,
) -> tuple[dict[str, list[LoraPiece]], str]:
    """Map a LoRA state dict onto `model`'s layers (a meta-device model is enough).

    Returns:
        ({our module name: [pieces]}, layout): layout "diffusers", "original", "kohya" (or several joined
        by '+').
    Raises:
        ValueError: keys that name no layer of this DiT (listing the first few), an unpaired factor, shapes
            that do not fit a layer (naming it), or non-finite values.
    """
    layers = lora_layers(model)
    table = target_table(model)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    groups, stray = _group_keys(state_dict, where)
    unmatched = list(stray)
    pieces: dict[str, list[LoraPiece]] = {}
    layouts = set()
    for module, group in groups.items():
        target = table.get(_strip_prefix(module))
        if target is None:
            unmatched += [f"{module}.{role}" for role in group]
            continue
        if "down" not in group or "up" not in group:
            missing = "up (lora_B)" if "up" not in group else "down (lora_A)"
            raise ValueError(f"{where}: {module} has no {missing} factor")
        layer = layers[target.module]
        rows = target_rows(target, layer.out_features, hidden or layer.in_features)
        factor = _factor(group, group["down"].shape[0], ignore_alpha, where, module)
        pieces.setdefault(target.module, []).append(
            _piece(group, layer, rows, factor, where, module, target.module))
        layouts.add("kohya" if module.find(".") < 0 else target.layout)
    if unmatched:
        raise ValueError(
            f"{where}: {len(unmatched)} keys match no layer of this HunyuanVideo DiT (a LoRA for another "
            f"model, or an unsupported kind such as DoRA or LoRA biases): {_examples(sorted(unmatched))}"
        )
    if not pieces:
        raise ValueError(f"{where} holds no LoRA factors")
    return pieces, "+".join(sorted(layouts))


def read_lora(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    name: str | None = None,
    ignore_alpha: bool = False,
) -> LoraWeights:
    """Read, check and map a LoRA file onto `model` (see `parse_lora`); nothing is applied yet."""
    path = check_lora_path(path)
    state_dict = read_lora_state_dict(path)
    pieces, layout = parse_lora(state_dict, model, where=f"LoRA {path.name}", ignore_alpha=ignore_alpha)
    weights = LoraWeights(name or path.stem, path, file_sha256(path), layout, pieces)
    logger.info("LoRA %s: %s layout, %d layers, %.1f M parameters", weights.name, layout, len(pieces),
                weights.num_parameters / 1e6)
    return weights
