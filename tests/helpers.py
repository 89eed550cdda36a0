"""Small helpers shared by the test files."""

from __future__ import annotations

import torch

from hyvideo.constants import DiTConfig

# The DiT tests' tiny architecture: 2 heads of 32 dims, 2 double + 2 single blocks, 4 latent channels.
TINY_DIT_TEST = DiTConfig(
    hidden_size=64, heads_num=2, rope_dim_list=(8, 12, 12), mm_double_blocks_depth=2, mm_single_blocks_depth=2,
    refiner_depth=1, text_states_dim=32, text_states_dim_2=16, in_channels=4, out_channels=4, guidance_embed=True,
)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute difference relative to the largest magnitude of `expected`."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)
