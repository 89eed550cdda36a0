"""Building blocks of the causal 3-D VAE: causal convolution, resnet, resamplers and the mid-block.

Attribute names (`conv`, `norm1`, `conv_shortcut`, `downsamplers`, `to_q`, `to_out.0`, ...) are the contract
with the official `pytorch_model.pt` and must not change. "Causal" means that output frame t depends only on
input frames <= t, except through GroupNorm, whose statistics span every frame of the (tile) input exactly as
in the original.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DOWN_BLOCK_TYPE = "DownEncoderBlockCausal3D"
UP_BLOCK_TYPE = "UpDecoderBlockCausal3D"
NORM_EPS = 1e-6
# GroupNorm runs over this many channel chunks (whole groups each), so its float32 temporaries stay small.
NORM_CHUNKS = 4

# F.pad order: (W_left, W_right, H_top, H_bottom, T_front, T_back).
Padding = tuple[int, int, int, int, int, int]


def empty_padded(
    x: torch.Tensor, shape: tuple[int, ...], pad: Padding | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An uninitialised buffer (x's dtype and device) of `shape` grown by `pad`, and its interior view."""
    if pad is None:
        out = x.new_empty(shape)
        return out, out
    wl, wr, ht, hb, tf, tb = pad
    B, C, T, H, W = shape
    out = x.new_empty(B, C, tf + T + tb, ht + H + hb, wl + W + wr)
    return out, out[:, :, tf : tf + T, ht : ht + H, wl : wl + W]


def fill_replicate_border(out: torch.Tensor, pad: Padding) -> torch.Tensor:
    """Fill the border of `out` around its filled interior as F.pad(mode="replicate") would."""
    wl, wr, ht, hb, tf, tb = pad
    _, _, T, H, W = out.shape
    core = out[:, :, tf : T - tb]  # frames that hold data
    rows = core[:, :, :, ht : H - hb]
    if wl:
        rows[..., :wl] = rows[..., wl : wl + 1]
    if wr:
        rows[..., W - wr :] = rows[..., W - wr - 1 : W - wr]
    if ht:  # full rows, so corners come out right
        core[:, :, :, :ht] = core[:, :, :, ht : ht + 1]
    if hb:
        core[:, :, :, H - hb :] = core[:, :, :, H - hb - 1 : H - hb]
    if tf:
        out[:, :, :tf] = out[:, :, tf : tf + 1]
    if tb:
        out[:, :, T - tb :] = out[:, :, T - tb - 1 : T - tb]
    return out


class GroupNorm32(nn.GroupNorm):
    """GroupNorm in float32, optionally fused with SiLU and a causal conv's replicate padding.

    The output has x's dtype. Groups are normalised a few at a time (GroupNorm treats groups independently),
    which keeps fp32 temporaries small, and written straight into the padded buffer the next conv reads.
    """

    def forward(self, x: torch.Tensor, silu: bool = False, pad: Padding | None = None) -> torch.Tensor:
        # Parity: the original runs fp16 under autocast, where group_norm and the SiLU after it run in fp32
        # and the next conv casts back to fp16; for fp32 inputs the casts below are no-ops.
        compute = torch.promote_types(x.dtype, torch.float32)
        if pad is None and compute == x.dtype:  # nothing to fuse: one native call
            h = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return F.silu(h, inplace=True) if silu else h
        out, interior = empty_padded(x, tuple(x.shape), pad)
        groups, group_size = self.num_groups, x.shape[1] // self.num_groups
        chunks = min(NORM_CHUNKS, groups)
        for i in range(chunks):
            g0, g1 = i * groups // chunks, (i + 1) * groups // chunks
            c = slice(g0 * group_size, g1 * group_size)
            weight = None if self.weight is None else self.weight[c].to(compute)
            bias = None if self.bias is None else self.bias[c].to(compute)
            h = F.group_norm(x[:, c].to(compute), g1 - g0, weight, bias, self.eps)
            if silu:
                h = F.silu(h, inplace=True)
            interior[:, c] = h
        return out if pad is None else fill_replicate_border(out, pad)


class CausalConv3d(nn.Module):
    """Conv3d with replicate padding: H/W padded symmetrically, time padded in front only."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int | tuple[int, int, int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        half = kernel_size // 2
        self.padding: Padding = (half, half, half, half, kernel_size - 1, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.padding):
            # Parity: replicate (not zero) padding, including H and W; two copies of frame 0 in front.
            x = F.pad(x, self.padding, mode="replicate")
        if needs_fp32_strided_conv(x, self.conv):
            return conv3d_in_float32(self.conv, x)
        return self.conv(x)


def needs_fp32_strided_conv(x: torch.Tensor, conv: nn.Conv3d) -> bool:
    """True where torch's CPU low-precision strided Conv3d kernel can return wrong values."""
    # Workaround: on CPUs with AMX (oneDNN's AMX bf16/fp16 path, torch 2.13.0+cpu), a Conv3d with stride > 1
    # over an input only 1-2 pixels wide returns garbage (rel error ~1.7 vs fp32, sometimes NaN); stride 1
    # and wider inputs are fine. The VAE's downsamplers hit it on small tiles. Only CPU low-precision
    # strided convs take the float32 route, so GPU paths and fp32 are untouched.
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)
        and any(s > 1 for s in conv.stride)
    )


def conv3d_in_float32(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) computed in float32 and cast back to x's dtype (weights cast per call, not stored)."""
    bias = None if conv.bias is None else conv.bias.float()
    out = F.conv3d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.to(x.dtype)


class ResnetBlockCausal3D(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, CausalConv3d) x 2, 1x1x1 shortcut if C changes."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_channels, eps=NORM_EPS, affine=True)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = GroupNorm32(groups, out_channels, eps=NORM_EPS, affine=True)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = (
            CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1. Residual branch; dropout (p=0) and output_scale_factor (1) of the original are identities.
        #    Norm + SiLU write straight into the causal padding of the next conv (saves a buffer).
        h = self.norm1(x, silu=True, pad=self.conv1.padding)  # (B, C_in, T+2, H+2, W+2)
        h = self.conv1.conv(h)  # (B, C_out, T, H, W)
        h = self.norm2(h, silu=True, pad=self.conv2.padding)
        h = self.conv2.conv(h)
        # 2. Shortcut; adding in place saves one activation-sized buffer.
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(shortcut)


class DownsampleCausal3D(nn.Module):
    """Strided causal conv: T -> (T-1)//s_t + 1, H -> H/2, W -> W/2 (first frame needs no special case)."""

    def __init__(self, channels: int, stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def upsample_nearest_first_frame_separately(
    x: torch.Tensor, factor: tuple[int, int, int], pad: Padding | None = None
) -> torch.Tensor:
    """Nearest upsampling where frame 0 is only upsampled in space: T -> 1 + f_t * (T - 1).

    Args:
        x: (B, C, T, H, W).
        factor: integer (f_t, f_h, f_w).
        pad: optional replicate padding (F.pad order) to add around the result, for the conv that follows.
    Returns:
        (B, C, 1 + f_t * (T - 1), f_h * H, f_w * W), grown by `pad` if given.
    """
    B, C, T, H, W = x.shape
    ft, fh, fw = factor
    out, interior = empty_padded(x, (B, C, 1 + ft * (T - 1), fh * H, fw * W), pad)
    # Nearest upsampling by integer factors is a broadcast copy, bit-identical to F.interpolate("nearest")
    # and free of its temporaries. Parity: the original's bf16 -> fp32 round trip around interpolate is a
    # no-op for a pure copy, so it is not reproduced.
    first = interior[:, :, :1].unflatten(3, (H, fh)).unflatten(5, (W, fw))  # (B, C, 1, H, fh, W, fw)
    first.copy_(x[:, :, :1, :, None, :, None].expand(B, C, 1, H, fh, W, fw))
    if T > 1:
        rest = interior[:, :, 1:].unflatten(2, (T - 1, ft)).unflatten(4, (H, fh)).unflatten(6, (W, fw))
        rest.copy_(x[:, :, 1:, None, :, None, :, None].expand(B, C, T - 1, ft, H, fh, W, fw))
    return out if pad is None else fill_replicate_border(out, pad)


class UpsampleCausal3D(nn.Module):
    """First-frame-separate nearest upsampling followed by a causal conv."""

    def __init__(self, channels: int, factor: tuple[int, int, int]) -> None:
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upsampled frames are written straight into the conv's causal padding.
        h = upsample_nearest_first_frame_separately(x, self.factor, self.conv.padding)  # (B, C, T'+2, ...)
        return self.conv.conv(h)


def prepare_causal_attention_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """The original's block-causal additive mask, built without a Python loop over rows.

    Token i (frame-major order) may attend token j iff frame(j) <= frame(i): 0 there, -inf elsewhere.
    `BlockCausalAttention` never materialises this (L, L) matrix; it is the reference definition.

    Returns:
        (L, L), or (batch_size, L, L) when batch_size is given, with L = num_frames * tokens_per_frame.
    """
    frame = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)  # (L,)
    visible = frame[None, :] <= frame[:, None]  # (L_q, L_k)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    if batch_size is not None:
        mask = mask.unsqueeze(0).expand(batch_size, -1, -1)
    return mask


def block_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int
) -> torch.Tensor:
    """Single-head attention where each token sees every token of its own and earlier frames.

    Equivalent to SDPA with `prepare_causal_attention_mask`, computed one query frame at a time against the
    visible key prefix: no (L, L) mask, and the masked half of the scores is never computed.

    Args:
        q, k, v: (B, L, D), tokens in frame-major order, L = num_frames * tokens_per_frame.
    Returns:
        (B, L, D).
    """
    B, L, D = q.shape
    n = L // num_frames
    q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)  # (B, 1, L, D)
    out = torch.empty_like(q)
    for f in range(num_frames):
        rows, visible = slice(f * n, (f + 1) * n), slice(0, (f + 1) * n)
        # Default scale 1/sqrt(D), as the original's SDPA call with heads = 1, dim_head = C.
        out[:, :, rows] = F.scaled_dot_product_attention(q[:, :, rows], k[:, :, visible], v[:, :, visible])
    return out.squeeze(1)


class BlockCausalAttention(nn.Module):
    """Mid-block self-attention over all (frame, y, x) tokens, 1 head of dim C, with a residual."""

    def __init__(self, channels: int, *, groups: int) -> None:
        super().__init__()
        self.group_norm = GroupNorm32(groups, channels, eps=NORM_EPS, affine=True)
        self.to_q = nn.Linear(channels, channels, bias=True)
        self.to_k = nn.Linear(channels, channels, bias=True)
        self.to_v = nn.Linear(channels, channels, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels, bias=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        # 1. GroupNorm over (C/G, T, H, W): the same statistics as the original's norm over (C/G, L) tokens.
        h = self.group_norm(x)  # (B, C, T, H, W)
        # 2. Tokens in frame-major order "b c f h w -> b (f h w) c".
        h = h.flatten(2).transpose(1, 2)  # (B, L, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)  # (B, L, C) each
        del h
        # 3. Block-causal attention and output projection.
        h = block_causal_attention(q, k, v, T)  # (B, L, C)
        h = self.to_out[0](h)
        # 4. Back to (B, C, T, H, W) and the residual (rescale_output_factor = 1).
        h = h.transpose(1, 2).reshape(B, C, T, H, W)
        return h.add_(x)


class UNetMidBlockCausal3D(nn.Module):
    """resnets.0 -> block-causal attention -> resnets.1, at the lowest resolution."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool = True) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlockCausal3D(channels, channels, groups=groups) for _ in range(2)]
        )
        attentions = [BlockCausalAttention(channels, groups=groups)] if add_attention else []
        self.attentions = nn.ModuleList(attentions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](x)  # (B, C, T, H, W)
        if len(self.attentions) > 0:
            h = self.attentions[0](h)
        return self.resnets[1](h)


def resnet_stack(in_channels: int, out_channels: int, *, num_layers: int, groups: int) -> nn.ModuleList:
    """`num_layers` resnet blocks; the first maps C_in -> C_out (shared by the down and up blocks)."""
    return nn.ModuleList(
        ResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels, groups=groups)
        for i in range(num_layers)
    )


class DownEncoderBlockCausal3D(nn.Module):
    """`num_layers` resnets (the first maps C_in -> C_out), then an optional strided downsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        downsample_stride: tuple[int, int, int] | None,
    ) -> None:
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers=num_layers, groups=groups)
        self.downsamplers = (
            nn.ModuleList([DownsampleCausal3D(out_channels, downsample_stride)])
            if downsample_stride is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlockCausal3D(nn.Module):
    """`num_layers` resnets (the first maps C_in -> C_out), then an optional first-frame-aware upsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        upsample_factor: tuple[int, int, int] | None,
    ) -> None:
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers=num_layers, groups=groups)
        self.upsamplers = (
            nn.ModuleList([UpsampleCausal3D(out_channels, upsample_factor)])
            if upsample_factor is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


def resample_factors(
    num_blocks: int, spatial_compression_ratio: int, time_compression_ratio: int
) -> list[tuple[int, int, int] | None]:
    """Per-block (t, h, w) down/up-sampling factors, assigned as the original does (None: no resampler).

    Space is halved in the first log2(spatial) blocks; time in the log2(time) blocks just before the last.
    For (128, 256, 512, 512), 8x, 4x: [(1, 2, 2), (2, 2, 2), (2, 2, 2), None]. The decoder uses the same list
    over its reversed blocks.
    """
    num_spatial = int(math.log2(spatial_compression_ratio))
    num_time = int(math.log2(time_compression_ratio))
    factors: list[tuple[int, int, int] | None] = []
    for i in range(num_blocks):
        is_final = i == num_blocks - 1
        spatial = i < num_spatial
        temporal = i >= num_blocks - 1 - num_time and not is_final
        s, t = (2 if spatial else 1), (2 if temporal else 1)
        factors.append((t, s, s) if (spatial or temporal) else None)
    return factors
