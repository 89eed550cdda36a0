"""Activations, the timm-style MLP, the pooled-text embedder and the final layer of the DiT."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..lowmem.chunking import map_token_chunks, resolve_chunk_tokens, token_ranges
from .modulate_layers import modulate
from .norm_layers import FP32LayerNorm

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def get_activation_layer(act_type: str) -> Callable[[], nn.Module]:
    """A constructor for the activation named `act_type` ("gelu", "gelu_tanh", "relu", "silu")."""
    if act_type not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act_type!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act_type]


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (the original's timm MLP with dropout 0 and no norm)."""

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        act_layer: Callable[[], nn.Module],
        *,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden_channels, bias=bias, dtype=dtype, device=device)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_channels, in_channels, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MLPEmbedder(nn.Module):
    """in_layer -> SiLU -> out_layer; embeds the CLIP pooled text vector (`vector_in`)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True, dtype=dtype, device=device)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The input comes from outside the model (fp16 CLIP output): cast to the weight dtype. Under autocast
        # this is the same rounding autocast itself would apply.
        return self.out_layer(self.silu(self.in_layer(x.to(self.in_layer.weight.dtype))))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) modulation of a non-affine LayerNorm, then a projection to patch pixels."""

    def __init__(
        self,
        hidden_size: int,
        patch_size: tuple[int, int, int],
        out_channels: int,
        act_layer: Callable[[], nn.Module],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.chunk_tokens: int | None = None  # token chunking (hyvideo/lowmem/chunking.py): None = automatic
        self.norm_final = FP32LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6, device=device)
        out_features = patch_size[0] * patch_size[1] * patch_size[2] * out_channels
        # Parity: the original builds this Linear without its dtype kwargs, so it is float32 whatever the
        # model precision. Under autocast it still runs in the autocast dtype; outside autocast it runs fp32.
        self.linear = nn.Linear(hidden_size, out_features, bias=True, dtype=torch.float32, device=device)
        self.adaLN_modulation = nn.Sequential(
            act_layer(), nn.Linear(hidden_size, 2 * hidden_size, bias=True, dtype=dtype, device=device)
        )

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """x (B, L_img, D), vec (B, D) -> (B, L_img, pt*ph*pw*C_out)."""
        # Parity: chunk order (shift, scale); diffusers stores the two halves swapped.
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        chunk = resolve_chunk_tokens(self.chunk_tokens, x.shape[1])
        if chunk < x.shape[1]:  # per token: the float32 normalised copy then exists one chunk at a time
            return map_token_chunks(
                lambda t: self._project(x[:, t], shift, scale), token_ranges(0, x.shape[1], chunk), x.shape[1]
            )
        return self._project(x, shift, scale)

    def _project(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = modulate(self.norm_final(x), shift, scale)  # float32 island
        return self.linear(x.to(self.linear.weight.dtype))
