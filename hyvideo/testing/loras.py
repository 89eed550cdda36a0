"""Random LoRAs for a DiT, written in each of the three layouts people share them in (tests, benchmarks).

The LoRA is made in diffusers' layout (one low-rank pair per diffusers Linear, so q, k and v get their own
A); the original and kohya layouts hold the same update with the fused projections' pairs stacked:
A = cat(A_q, A_k, A_v), B = the B's in their rows of the fused weight, so every layout means the same LoRA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hyvideo.modules.loading import diffusers_names_of
from hyvideo.modules.lora_files import LoraTarget, lora_layers, target_rows

LoraDict = dict[str, torch.Tensor]


def _part_shapes(layer: nn.Module, kind: str, parts: int, hidden: int) -> list[int]:
    rows = [target_rows(LoraTarget("", "diffusers", kind, i), layer.out_features, hidden) for i in range(parts)]
    return [layer.out_features if r is None else len(r) for r in rows]


def random_diffusers_lora(
    model: nn.Module,
    *,
    rank: int = 4,
    std: float = 0.1,
    seed: int = 0,
    select: Callable[[str], bool] = lambda name: True,
) -> LoraDict:
    """`transformer.<diffusers module>.lora_A/lora_B.weight` for every Linear of `model` that `select` keeps.

    Works on a meta-device model. A ~ N(0, std), B ~ N(0, std) (both non-zero, so the LoRA does something).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    out: LoraDict = {}
    for name, layer in lora_layers(model).items():
        rule = diffusers_names_of(name)
        if rule is None or not select(name):
            continue
        kind, diffusers_names = rule
        for diffusers_name, rows in zip(diffusers_names, _part_shapes(layer, kind, len(diffusers_names), hidden)):
            out[f"transformer.{diffusers_name}.lora_A.weight"] = torch.randn(rank, layer.in_features,
                                                                             generator=gen) * std
            out[f"transformer.{diffusers_name}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * std
    return out


def fused_pairs(diffusers_lora: LoraDict, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{our module: (A (R, in), B (out, R))}: the diffusers-layout LoRA with each fused layer's parts stacked."""
    hidden = model.config.hidden_size
    pairs = {}
    for name, layer in lora_layers(model).items():
        rule = diffusers_names_of(name)
        if rule is None:
            continue
        kind, diffusers_names = rule
        downs, ups = [], []
        for part, diffusers_name in enumerate(diffusers_names):
            key = f"transformer.{diffusers_name}.lora_A.weight"
            if key not in diffusers_lora:
                continue
            down, up = diffusers_lora[key], diffusers_lora[key.replace("lora_A", "lora_B")]
            rows = target_rows(LoraTarget(name, "diffusers", kind, part), layer.out_features, hidden)
            if rows is not None:
                up = torch.zeros(layer.out_features, up.shape[1]).index_copy_(0, rows, up)
            downs.append(down)
            ups.append(up)
        if downs:
            pairs[name] = (torch.cat(downs), torch.cat(ups, dim=1))
    return pairs


def to_original_layout(diffusers_lora: LoraDict, model: nn.Module, prefix: str = "diffusion_model.") -> LoraDict:
    """The same LoRA as `<prefix><our module>.lora_A/lora_B.weight` (musubi-tuner / ComfyUI)."""
    out: LoraDict = {}
    for name, (down, up) in fused_pairs(diffusers_lora, model).items():
        out[f"{prefix}{name}.lora_A.weight"] = down
        out[f"{prefix}{name}.lora_B.weight"] = up
    return out


def to_kohya_layout(diffusers_lora: LoraDict, model: nn.Module, *, alpha: float | None = None,
                    prefix: str = "lora_unet_") -> LoraDict:
    """The same LoRA as kohya keys; with `alpha`, B is divided by alpha / rank so that the update is unchanged."""
    out: LoraDict = {}
    for name, (down, up) in fused_pairs(diffusers_lora, model).items():
        key = prefix + name.replace(".", "_")
        rank = down.shape[0]
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up if alpha is None else up * (rank / alpha)
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out
