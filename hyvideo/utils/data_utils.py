"""Small shape helpers: size alignment and an image grid (a torchvision.utils.make_grid stand-in)."""

from __future__ import annotations

import math

import torch


def align_to(value: int, alignment: int) -> int:
    """Round `value` up to the nearest multiple of `alignment` (e.g. align_to(720, 16) == 720, 721 -> 736)."""
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"alignment must be a positive integer, got {alignment!r}.")
    if isinstance(value, int):
        return -(-value // alignment) * alignment
    # Parity: upstream computes int(math.ceil(value / alignment) * alignment), which also takes floats.
    return int(math.ceil(value / alignment) * alignment)


def make_grid(
    images: torch.Tensor,
    *,
    nrow: int = 1,
    padding: int = 2,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Tile a batch of images into one image, like torchvision.utils.make_grid (normalize=False).

    Args:
        images: (B, C, H, W) with C in {1, 3}; a single-channel batch is repeated to 3 channels.
        nrow: images per grid row (1 stacks the batch vertically, as upstream's save_videos_grid does).
        padding: pixels of `pad_value` around and between the images.
        pad_value: value of the padding pixels.

    Returns:
        (C, rows·(H+padding)+padding, ncol·(W+padding)+padding); for B == 1 the image itself, unpadded.
    """
    if images.ndim != 4:
        raise ValueError(f"make_grid expects a (B, C, H, W) tensor, got shape {tuple(images.shape)}.")
    if nrow < 1 or padding < 0:
        raise ValueError(f"nrow must be >= 1 and padding >= 0, got nrow={nrow}, padding={padding}.")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    num_images, channels, height, width = images.shape
    # Parity: torchvision returns a lone image unchanged (no padding at all).
    if num_images == 1:
        return images[0]
    num_cols = min(nrow, num_images)
    num_rows = math.ceil(num_images / num_cols)
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, cell_h * num_rows + padding, cell_w * num_cols + padding), pad_value)
    for k in range(num_images):
        row, col = divmod(k, num_cols)
        top, left = row * cell_h + padding, col * cell_w + padding
        grid[:, top : top + height, left : left + width] = images[k]
    return grid
