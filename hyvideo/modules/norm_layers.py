"""Normalisation layers of the DiT, each with its float32 island made explicit.

The original runs the DiT under `torch.autocast(bf16)`, where CUDA autocast evaluates LayerNorm in float32 and
returns float32. CPU autocast does not, so the islands are written out here rather than left to autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 that returns float32; the caller decides when to round back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim: normalise in float32, round to the input dtype, then scale by `weight`."""

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        # Parity: the weight multiplies the already rounded value (not the float32 one).
        return out if self.weight is None else out * self.weight


def get_norm_layer(
    norm_type: str,
    dim: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """The q/k norm named by `DiTConfig.qk_norm_type`: "rms" or "layer" (both affine, eps 1e-6)."""
    if norm_type == "rms":
        return RMSNorm(dim, eps=1e-6, dtype=dtype, device=device)
    if norm_type == "layer":
        return FP32LayerNorm(dim, eps=1e-6, elementwise_affine=True, dtype=dtype, device=device)
    raise ValueError(f"unknown norm type {norm_type!r}; expected 'rms' or 'layer'")
