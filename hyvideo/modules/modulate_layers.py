"""adaLN modulation: the conditioning vector -> (shift, scale, gate) triples, and how they are applied."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn


class ModulationOut(NamedTuple):
    """One (shift, scale, gate) triple, each (B, D), or (B, L, D) per token (see `TokenReplace`)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) * (1 + scale) + shift, shift/scale (B, D) broadcast over tokens, or per token (B, L, D).

    Type promotion is deliberate: a float32 `x` (a LayerNorm output) with low-precision shift/scale gives a
    float32 result, as in the original under autocast (`1 + scale` itself stays in scale's dtype).
    """
    if shift.ndim == 3:  # per-token values (token replace)
        return x * (1 + scale) + shift
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def apply_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) * gate (B, D) broadcast over tokens, or per token (B, L, D)."""
    return x * (gate if gate.ndim == 3 else gate.unsqueeze(1))


class TokenReplace(NamedTuple):
    """I2V token replace: the first `tokens` tokens of the image stream take their modulation from `vec`.

    `vec` (B, D) = time_in(0) + vector_in(pooled CLIP), without the guidance term; `tokens` is the number
    of this rank's image tokens that belong to latent frame 0 (a prefix of its local tokens).
    """

    vec: torch.Tensor
    tokens: int


def per_token_modulation(mod: ModulationOut, first: ModulationOut, count: int, length: int) -> ModulationOut:
    """(B, L, D) triples: `first` for tokens [0, count), `mod` for [count, length)."""
    def rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        batch, dim = a.shape
        first_rows = b[:, None].expand(batch, count, dim)
        return torch.cat((first_rows, a[:, None].expand(batch, length - count, dim)), dim=1)

    return ModulationOut(*(rows(a, b) for a, b in zip(mod, first, strict=True)))


def token_modulations(
    module: ModulateDiT, vec: torch.Tensor, token_replace: TokenReplace | None, length: int
) -> tuple[ModulationOut, ...]:
    """`module(vec)`; with token replace, per-token triples for a stream of `length` tokens.

    Parity: the original modulates the first-frame tokens and the others separately and concatenates;
    elementwise maths per token are the same here.
    """
    mods = module(vec)
    if token_replace is None or token_replace.tokens == 0:
        return mods
    firsts = module(token_replace.vec)
    count = min(token_replace.tokens, length)
    return tuple(per_token_modulation(m, f, count, length) for m, f in zip(mods, firsts, strict=True))


def modulation_rows(mod: ModulationOut, tokens: slice) -> ModulationOut:
    """The triple for the tokens `tokens` of a stream (unchanged when it is per sample)."""
    if mod.shift.ndim == 2:
        return mod
    return ModulationOut(*(m[:, tokens] for m in mod))


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
