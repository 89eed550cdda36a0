"""3-D rotary position embedding (RoPE) of the image tokens: the cos/sin tables and their application.

Convention (the original's, not NeoX's): every frequency is duplicated on two adjacent channels, and each
channel pair (x[2i], x[2i+1]) is rotated as a complex number. The three axes (t, h, w) own consecutive channel
ranges of `rope_dim_list` channels, in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rope_frequencies(dim: int, theta: float) -> torch.Tensor:
    """w_k = 1 / theta^(2k / dim) for k = 0 .. dim/2 - 1, float32 (dim // 2,)."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"a RoPE axis needs a positive even number of channels, got {dim}")
    # Parity: same expression as the original, `theta ** (arange(0, dim, 2)[: dim // 2] / dim)` in float32.
    return 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))


def get_1d_rotary_pos_embed(dim: int, pos: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of pos * w_k, each frequency repeated on 2 adjacent channels: two (S, dim) float32 tables."""
    angles = torch.outer(pos.float(), rope_frequencies(dim, theta).to(pos.device))  # (S, dim/2)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def get_rotary_pos_embed(
    latent_thw: Sequence[int],
    rope_dim_list: Sequence[int],
    theta: float,
    patch_size: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for the image tokens of a latent video.

    Args:
        latent_thw: latent (T, H, W) before patching; each must be divisible by its patch size.
        rope_dim_list: channels per axis (t, h, w); they sum to the head dim.
        theta: RoPE base (256 for HunyuanVideo).
        patch_size: DiT patch (pt, ph, pw).
    Returns:
        (freqs_cos, freqs_sin), each (L_img, sum(rope_dim_list)) float32 on the CPU, with
        L_img = T/pt * H/ph * W/pw and rows in token order (t-major, then h, then w).
    """
    if len(latent_thw) != 3 or len(rope_dim_list) != 3 or len(patch_size) != 3:
        raise ValueError("latent_thw, rope_dim_list and patch_size must each have 3 entries (t, h, w)")
    for n, p, axis in zip(latent_thw, patch_size, "thw", strict=True):
        if n <= 0 or n % p:
            raise ValueError(
                f"latent size {n} along {axis} must be a positive multiple of the patch size {p}"
            )
    sizes = [n // p for n, p in zip(latent_thw, patch_size, strict=True)]
    # Integer positions 0..n-1 (the original's linspace(0, n, n + 1)[:n] holds exactly these values).
    grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in sizes), indexing="ij")
    tables = [
        get_1d_rotary_pos_embed(dim, g.reshape(-1), theta) for dim, g in zip(rope_dim_list, grid, strict=True)
    ]
    return torch.cat([c for c, _ in tables], dim=1), torch.cat([s for _, s in tables], dim=1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation of x (B, L, H, D) in float32, rounded back to x's dtype."""
    x32 = x.float()
    pairs = x32.unflatten(-1, (-1, 2))  # (B, L, H, D/2, 2)
    # rotate_half: (x[2i], x[2i+1]) -> (-x[2i+1], x[2i]); the original's formula, and faster on the CPU than
    # working on strided even/odd views.
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x32 * cos[:, None] + rotated * sin[:, None]).type_as(x)


def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys of the image tokens.

    Args:
        xq, xk: (B, L_img, H, D) in any float dtype.
        freqs_cos, freqs_sin: (L_img, D) float32 tables from `get_rotary_pos_embed`.
    Returns:
        Rotated (xq, xk), same shapes and dtypes; the math runs in float32.
    """
    expected = (xq.shape[1], xq.shape[-1])
    if tuple(freqs_cos.shape) != expected or tuple(freqs_sin.shape) != expected:
        raise ValueError(
            f"RoPE tables have shapes {tuple(freqs_cos.shape)} / {tuple(freqs_sin.shape)}, expected "
            f"(L_img, head_dim) = {expected}; recompute them for this latent size"
        )
    cos, sin = freqs_cos.to(xq.device), freqs_sin.to(xq.device)
    return _rotate(xq, cos, sin), _rotate(xk, cos, sin)
