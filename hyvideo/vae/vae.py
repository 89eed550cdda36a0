"""Causal 3-D encoder and decoder of the HunyuanVideo VAE, and the diagonal Gaussian posterior."""

from __future__ import annotations

import math

import torch
from torch import nn

from hyvideo.vae.unet_causal_3d_blocks import (
    NORM_EPS,
    CausalConv3d,
    DownEncoderBlockCausal3D,
    GroupNorm32,
    UNetMidBlockCausal3D,
    UpDecoderBlockCausal3D,
    resample_factors,
)


class EncoderCausal3D(nn.Module):
    """Video (B, C_in, T, H, W) -> moments (B, 2*C_lat, (T-1)/4+1, H/8, W/8) before `quant_conv`."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        *,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        spatial_compression_ratio: int,
        time_compression_ratio: int,
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        groups = norm_num_groups
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], 3)
        strides = resample_factors(len(block_out_channels), spatial_compression_ratio, time_compression_ratio)
        blocks = []
        channels = block_out_channels[0]
        for out_channels, stride in zip(block_out_channels, strides, strict=True):
            blocks.append(
                DownEncoderBlockCausal3D(
                    channels,
                    out_channels,
                    num_layers=layers_per_block,
                    groups=groups,
                    downsample_stride=stride,
                )
            )
            channels = out_channels
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UNetMidBlockCausal3D(channels, groups=groups, add_attention=mid_block_add_attention)
        self.conv_norm_out = GroupNorm32(groups, channels, eps=NORM_EPS)
        # double_z: mean and logvar.
        self.conv_out = CausalConv3d(channels, 2 * latent_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C_0, T, H, W)
        for block in self.down_blocks:
            h = block(h)  # -> (B, C_last, T_lat, H/8, W/8)
        h = self.mid_block(h)
        h = self.conv_norm_out(h, silu=True, pad=self.conv_out.padding)
        return self.conv_out.conv(h)  # (B, 2*C_lat, T_lat, H_lat, W_lat)


class DecoderCausal3D(nn.Module):
    """Latents (B, C_lat, T, h, w) -> video (B, C_out, 4(T-1)+1, 8h, 8w), after `post_quant_conv`."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        *,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        spatial_compression_ratio: int,
        time_compression_ratio: int,
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        groups = norm_num_groups
        reversed_channels = tuple(reversed(block_out_channels))
        self.conv_in = CausalConv3d(latent_channels, reversed_channels[0], 3)
        self.mid_block = UNetMidBlockCausal3D(
            reversed_channels[0], groups=groups, add_attention=mid_block_add_attention
        )
        factors = resample_factors(len(block_out_channels), spatial_compression_ratio, time_compression_ratio)
        blocks = []
        channels = reversed_channels[0]
        for out_ch, factor in zip(reversed_channels, factors, strict=True):
            # Parity: decoder blocks have layers_per_block + 1 resnets (3 for the released model).
            blocks.append(
                UpDecoderBlockCausal3D(
                    channels, out_ch, num_layers=layers_per_block + 1, groups=groups, upsample_factor=factor
                )
            )
            channels = out_ch
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = GroupNorm32(groups, channels, eps=NORM_EPS)
        self.conv_out = CausalConv3d(channels, out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, C_last, T, h, w)
        h = self.mid_block(h)
        # Parity: the original casts to the up blocks' parameter dtype after the mid block.
        h = h.to(self.up_blocks[0].resnets[0].conv1.conv.weight.dtype)
        for block in self.up_blocks:
            h = block(h)  # -> (B, C_0, 4(T-1)+1, 8h, 8w)
        h = self.conv_norm_out(h, silu=True, pad=self.conv_out.padding)
        return self.conv_out.conv(h)  # (B, C_out, T', H, W)


class DiagonalGaussianDistribution:
    """Posterior N(mean, exp(logvar)) from encoder moments split along channels (first half = mean)."""

    def __init__(self, moments: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = moments
        dim = 2 if moments.ndim == 3 else 1  # (B, L, 2C) or (B, 2C, ...)
        self.mean, logvar = torch.chunk(moments, 2, dim=dim)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps drawn on the generator's device (as diffusers' randn_tensor) then moved."""
        noise_device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(
            self.mean.shape, generator=generator, device=noise_device, dtype=self.parameters.dtype
        )
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other), or against N(0, I) when other is None; summed over all but the batch dim."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        dims = list(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(
            log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims)
        )
