"""Input embedders of the DiT: latent patches, timesteps and pooled text projections."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Conv3d patchifier (`img_in`): (B, C, T, H, W) -> (B, T'*H'*W', D), tokens t-major then h then w."""

    def __init__(
        self,
        patch_size: tuple[int, int, int],
        in_chans: int,
        embed_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(
            in_chans,
            embed_dim,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            bias=True,
            dtype=dtype,
            device=device,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Latents arrive as fp16 noise or fp32 (scheduler): cast to the weight dtype, which under autocast is
        # the same rounding autocast would do.
        x = self.proj(x.to(self.proj.weight.dtype))  # (B, D, T', H', W')
        return x.flatten(2).transpose(1, 2)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t*w_k), sin(t*w_k)], w_k = max_period^(-k/half), k < half = dim // 2.

    Args:
        t: (B,) timesteps (any float/int dtype; used in float32).
        dim: output width; an odd width gets one zero column appended.
    Returns:
        (B, dim) float32.
    """
    half = dim // 2
    # Parity: the frequencies are computed on the CPU and then moved, as in the original (a GPU `exp` can
    # differ in the last bit).
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """timestep_embedding(t, 256) -> Linear -> act -> Linear (time_in, guidance_in, refiner t_embedder)."""

    def __init__(
        self,
        hidden_size: int,
        act_layer: Callable[[], nn.Module],
        frequency_embedding_size: int = 256,
        max_period: float = 10000.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True, dtype=dtype, device=device),
            act_layer(),
            nn.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) -> (B, D)."""
        # Parity: the float32 sinusoid is cast to the weight dtype before the MLP.
        t_freq = timestep_embedding(t, self.frequency_embedding_size, self.max_period)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class TextProjection(nn.Module):
    """linear_1 -> act_1 -> linear_2: projects the pooled LLM context in the token refiner (`c_embedder`)."""

    def __init__(
        self,
        in_channels: int,
        hidden_size: int,
        act_layer: Callable[[], nn.Module],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, hidden_size, bias=True, dtype=dtype, device=device)
        self.act_1 = act_layer()
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is the float32 masked mean: round it to the weight dtype as autocast would.
        return self.linear_2(self.act_1(self.linear_1(x.to(self.linear_1.weight.dtype))))
