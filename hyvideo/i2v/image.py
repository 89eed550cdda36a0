"""The reference image of image-to-video: loading + validation, resolution buckets, resize and crop.

Pure functions over PIL images and tensors; nothing here loads a model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

# --i2v-resolution -> the base size of its buckets (a bucket has about base x base pixels).
I2V_RESOLUTIONS: dict[str, int] = {"720p": 960, "540p": 720, "360p": 480}
BUCKET_STEP = 32  # bucket sides are multiples of this
BUCKET_MAX_RATIO = 4.0  # longest / shortest side of a bucket
MIN_IMAGE_SIDE = 16
MAX_IMAGE_PIXELS = 100_000_000


def crop_size_list(base_size: int, step: int = BUCKET_STEP, max_ratio: float = BUCKET_MAX_RATIO):
    """All buckets (H, W) of about base_size^2 pixels, as multiples of `step`, in the original's order.

    Walks wp from N = (base/step)^2 down to 1 with hp growing while hp * wp <= N; a pair (wp, hp) becomes
    the bucket (H, W) = (step * wp, step * hp) when its side ratio is at most `max_ratio`.
    """
    n_patches = round((base_size / step) ** 2)
    buckets: list[tuple[int, int]] = []
    wp, hp = n_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            # Parity: the first coordinate is the height (the original names it wp but uses it as h).
            buckets.append((step * wp, step * hp))
        if (hp + 1) * wp <= n_patches:
            hp += 1
        else:
            wp -= 1
    return buckets


def closest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (H, W) whose H/W (rounded to 5 places) is closest to height/width.

    Parity: asymmetric like the original: a portrait or square image (H/W >= 1) only considers buckets with
    ratio <= H/W, a landscape one only buckets with ratio strictly > H/W; the first bucket wins a tie.
    """
    aspect = float(height) / float(width)
    ratios = [round(h / w, 5) for h, w in buckets]
    if aspect >= 1:
        candidates = [i for i, r in enumerate(ratios) if r <= aspect]
    else:
        candidates = [i for i, r in enumerate(ratios) if r > aspect]
    if not candidates:
        raise ValueError(f"no resolution bucket fits an image of {width}x{height} (W x H)")
    best = min(candidates, key=lambda i: abs(ratios[i] - aspect))
    return buckets[best]


def bucket_for_image(height: int, width: int, resolution: str) -> tuple[int, int]:
    """(H, W) of the video for a reference image of height x width at --i2v-resolution `resolution`."""
    if resolution not in I2V_RESOLUTIONS:
        raise ValueError(f"--i2v-resolution must be one of {sorted(I2V_RESOLUTIONS)}, got {resolution!r}")
    return closest_bucket(height, width, crop_size_list(I2V_RESOLUTIONS[resolution]))


def load_reference_image(path: str | os.PathLike):
    """Open and check the --i2v-image-path image; returns an RGB PIL image.

    Greyscale, palette and RGBA images are converted to RGB (Parity: the original's `convert("RGB")`,
    which drops alpha without compositing). Raises FileNotFoundError / ValueError with one-line messages.
    """
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"--i2v-image-path {file}: no such file; give the path of a PNG/JPEG/WebP image"
        )
    try:
        with Image.open(file) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"--i2v-image-path {file}: {width}x{height} is too large (more than "
                    f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels); downscale it first"
                )
            opened.load()
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(
            f"--i2v-image-path {file}: not a readable image ({type(exc).__name__}: {exc})"
        ) from None
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"--i2v-image-path {file}: {width}x{height} is too small; each side needs >= {MIN_IMAGE_SIDE} "
            "pixels"
        )
    return image


def _resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(W, H) after scaling the shorter side to `short_side` (the longer side truncated, like torchvision)."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def resize_and_center_crop(image, bucket: tuple[int, int]):
    """PIL RGB image -> the bucket (H, W): shorter side to min(bucket) (bilinear), then a center crop.

    Parity: torchvision's Resize(min(bucket)) + CenterCrop(bucket) on a PIL image, as the original does
    (round-half-even crop offsets; zero padding where the resized image is smaller than the crop).
    """
    from PIL import Image

    bucket_h, bucket_w = bucket
    new_w, new_h = _resized_size(*image.size, min(bucket))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if new_w < bucket_w or new_h < bucket_h:
        padded = Image.new("RGB", (max(new_w, bucket_w), max(new_h, bucket_h)))
        padded.paste(image, (max(bucket_w - new_w, 0) // 2, max(bucket_h - new_h, 0) // 2))
        image, (new_w, new_h) = padded, padded.size
    top = int(round((new_h - bucket_h) / 2.0))
    left = int(round((new_w - bucket_w) / 2.0))
    return image.crop((left, top, left + bucket_w, top + bucket_h))


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB image (W x H) -> (1, 3, 1, H, W) float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    pixels = array.permute(2, 0, 1).float().div(255.0)
    return ((pixels - 0.5) / 0.5)[None, :, None]
