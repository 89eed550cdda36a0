"""The reference image of an image-to-video job: a base64 data URL in the request, checked like the CLI's
--i2v-image-path (hyvideo.i2v.load_reference_image), stored as the client's encoded bytes.

A request carries `"image": "data:image/png;base64,..."` (or image/jpeg, image/webp). It is decoded once at
request time, so that a bad image is a 400 and never a failed job; the worker decodes the stored bytes again
with the same function (`decode_image`), so the job samples exactly the image that was checked. Errors name
the problem and never echo the value (it may be megabytes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass
from typing import Any

from hyvideo.config import ServerLimits
from hyvideo.i2v.image import MIN_IMAGE_SIDE

# The formats the CLI's README promises (PNG/JPEG/WebP); Pillow's other decoders (some far less hardened)
# are never reached from a request.
MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
_DATA_URL = re.compile(r"^data:([a-zA-Z0-9.+/-]*)((?:;[a-zA-Z0-9=.+-]+)*)?,", re.ASCII)


class ImageError(ValueError):
    """An image a request may not carry; the message says what was wrong and how to fix it."""


@dataclass(frozen=True)
class ReferenceImage:
    """A checked reference image: the client's encoded bytes and what the job records about them."""

    data: bytes
    format: str  # PNG, JPEG or WEBP (what Pillow found, not what the data URL claimed)
    width: int
    height: int
    sha256: str

    def record(self) -> dict[str, Any]:
        """What the job (and its sidecar) keeps about the image: never its bytes."""
        return {"sha256": self.sha256, "bytes": len(self.data), "format": self.format, "width": self.width,
                "height": self.height}


def parse_data_url(value: Any, limits: ServerLimits) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL; raise ImageError."""
    if not isinstance(value, str):
        raise ImageError("image must be a string: a data URL such as data:image/png;base64,iVBOR...")
    match = _DATA_URL.match(value[:200])
    if match is None:
        raise ImageError("image must be a data URL: data:image/png;base64,... (or image/jpeg, image/webp); "
                         f"it starts with {value[:20]!r}")
    media_type, params = match.group(1).lower(), (match.group(2) or "").lower().split(";")
    if media_type not in MEDIA_TYPES:
        raise ImageError(f"image: media type {media_type[:40]!r} is not offered; send image/png, "
                         "image/jpeg or image/webp")
    if "base64" not in params:
        raise ImageError("image: the data URL must be base64-encoded (data:image/png;base64,...)")
    try:  # the body limit (hyvideo.server.api.body_limit) already bounds what is decoded here
        data = base64.b64decode(value[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image: the data URL's payload is not valid base64") from None
    if len(data) > limits.max_image_bytes:
        raise ImageError(f"image is over {limits.max_image_bytes:,} bytes (--max-image-bytes); downscale or "
                         "recompress it")
    if not data:
        raise ImageError("image: the data URL is empty")
    return data


def decode_image(data: bytes, limits: ServerLimits | None = None):
    """Encoded bytes -> an RGB PIL image, checked as the CLI loader does (and by `limits`' side)."""
    return _decode(data, limits)[0]


def _decode(data: bytes, limits: ServerLimits | None) -> tuple[Any, str]:
    """(RGB PIL image, Pillow's format name) of encoded bytes.

    Parity with hyvideo.i2v.load_reference_image: the first frame of an animated image, and greyscale,
    palette and RGBA converted by `convert("RGB")` (alpha dropped without compositing).
    """
    from PIL import Image, UnidentifiedImageError

    # No limits: the worker decoding an image that was checked when it was queued (the server may have been
    # restarted with a smaller --max-image-side since; the job keeps what it was accepted with).
    max_side = limits.max_image_side if limits is not None else None
    try:
        with Image.open(io.BytesIO(data), formats=sorted(set(MEDIA_TYPES.values()))) as opened:
            width, height = opened.size  # from the header: a huge image is refused before it is decoded
            if max_side is not None and max(width, height) > max_side:
                raise ImageError(f"image is {width}x{height}; each side may have at most {max_side} pixels "
                                 "(the video's bucket is far smaller): downscale it")
            opened.load()
            image, found = opened.convert("RGB"), opened.format
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"image is not a readable PNG/JPEG/WebP image ({type(exc).__name__})") from None
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageError(f"image is {width}x{height}; each side needs >= {MIN_IMAGE_SIDE} pixels")
    return image, found


def check_image(value: Any, limits: ServerLimits) -> tuple[ReferenceImage, Any]:
    """A request's `image` value -> (the checked image, its RGB PIL image); raise ImageError."""
    data = parse_data_url(value, limits)
    image, found = _decode(data, limits)
    checked = ReferenceImage(data=data, format=found, width=image.width, height=image.height,
                             sha256=hashlib.sha256(data).hexdigest())
    return checked, image
