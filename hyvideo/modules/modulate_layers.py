"""adaLN modulation: the conditioning vector -> (shift, scale, gate) triples, and how they are applied."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn


class ModulationOut(NamedTuple):
    """One (shift, scale, gate) triple, each (B, D)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) * (1 + scale) + shift, with shift/scale (B, D) broadcast over tokens.

    Type promotion is deliberate: a float32 `x` (a LayerNorm output) with low-precision shift/scale gives a
    float32 result, as in the original under autocast (`1 + scale` itself stays in scale's dtype).
    """
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def apply_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) * gate (B, D) broadcast over tokens."""
    return x * gate.unsqueeze(1)


class ModulateDiT(nn.Module):
    """linear(act(vec)) split into `factor / 3` ModulationOut triples, in (shift, scale, gate) order."""

    def __init__(
        self,
        hidden_size: int,
        factor: int,
        act_layer: Callable[[], nn.Module],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if factor % 3 != 0:
            raise ValueError(f"modulation factor must be a multiple of 3, got {factor}")
        self.factor = factor
        self.act = act_layer()
        self.linear = nn.Linear(hidden_size, factor * hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, vec: torch.Tensor) -> tuple[ModulationOut, ...]:
        chunks = self.linear(self.act(vec)).chunk(self.factor, dim=-1)
        return tuple(ModulationOut(*chunks[i : i + 3]) for i in range(0, self.factor, 3))
