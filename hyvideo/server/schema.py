"""A job request: what a client may ask for, checked against the server's limits, as SamplingConfig values.

One request shape serves the web page and `/v1/videos`. Field names follow OpenAI's video API where it has
one (`prompt`, `size` as "WIDTHxHEIGHT", `seconds`, `model`, `n`); the rest are ours and documented in
README.md ("Web server"). Every field maps onto one `SamplingConfig` field (`SAMPLING_FIELDS`); fields the
server's flags leave open take their value from those flags. Features that are not sampling settings
(LoRA, step cache, prompt rewrite, ...) go in `FEATURE_FIELDS`: a name and a validator, which sees the
value and the `ServerOffer` (the limits and what the server has loaded); the worker hands the validated
values to `hyvideo.server.worker.feature_kwargs` (and LoRA scales to `job_lora_scales`).

Nothing here touches the file system: a request names no path.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hyvideo.config import SamplingConfig, ServerLimits
from hyvideo.diffusion.cache import CACHE_POLICIES
from hyvideo.server.images import ImageError, ReferenceImage, check_image

FPS = 24
MODEL_ID = "hunyuanvideo-t2v-720p"
MAX_SEED = 2**63 - 1_000  # seeds seed .. seed + n - 1 must stay below 2**63 (SQLite, torch)
GUIDANCE_RANGE = (1.0, 20.0)  # the original page's sliders
FLOW_SHIFT_RANGE = (0.0, 20.0)  # open at 0
# Per-job LoRA scales stay within +-10. Shared LoRAs are used at about -2..2; far beyond that the update
# swamps the base weights (noise, or inf in fp16 weights), and a merged layer whose delta is that large
# keeps a whole copy of its weight in host memory to be restored exactly (hyvideo/modules/lora.py), so a
# client could otherwise make the server hold a second DiT in RAM.
MAX_LORA_SCALE = 10.0
_ECHO_CHARS = 40  # a client's name is echoed in an error up to this length: the message stays one short line
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")

# Resolution presets of the original (README "supported resolutions"; gradio offers the same ten), as
# (label, width, height).
RESOLUTION_PRESETS = (
    ("720p 16:9", 1280, 720), ("720p 9:16", 720, 1280), ("720p 4:3", 1104, 832), ("720p 3:4", 832, 1104),
    ("720p 1:1", 960, 960), ("540p 16:9", 960, 544), ("540p 9:16", 544, 960), ("540p 4:3", 832, 624),
    ("540p 3:4", 624, 832), ("540p 1:1", 720, 720),
)
LENGTH_PRESETS = (("2s (65 frames)", 65), ("5s (129 frames)", 129))  # the original page's lengths


class RequestError(ValueError):
    """A request the server refuses; the message says which field was wrong and how to fix it."""


@dataclass(frozen=True)
class ServerOffer:
    """What a feature validator checks a request against: the limits, and what the server has loaded."""

    limits: ServerLimits
    loras: Mapping[str, float] = field(default_factory=dict)  # preloaded LoRA name -> start-up scale
    i2v_resolution: str | None = None  # --i2v-resolution of an image-to-video server; None: text-to-video


def _cache_policy(value: Any, offer: ServerOffer) -> str:
    if value not in CACHE_POLICIES:
        raise RequestError(f"cache must be one of {', '.join(CACHE_POLICIES)}, got {_echo(value)}")
    return value


def _cache_threshold(value: Any, offer: ServerOffer) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"cache_threshold must be a number >= 0, got {_kind(value)}")
    number = _finite(value)
    if number is None or number < 0:
        raise RequestError(f"cache_threshold must be a number >= 0, got {_echo(value)}")
    return number


def _loras(value: Any, offer: ServerOffer) -> dict[str, float]:
    """{name: scale} for some of the server's preloaded LoRAs; names only, never a path."""
    if not isinstance(value, Mapping):
        raise RequestError(f'loras must be an object mapping a LoRA name to a scale, e.g. {{"name": 0.8}}, '
                           f"got {_kind(value)}")
    if value and not offer.loras:
        raise RequestError("loras: this server has no LoRAs loaded; start it with --lora PATH[:SCALE] to "
                           "offer some")
    loaded = ", ".join(offer.loras)
    if len(value) > len(offer.loras):  # bounds the work and the message before looking at any name
        raise RequestError(f"loras has {len(value)} entries but the server has {len(offer.loras)} LoRAs: "
                           f"{loaded}")
    scales = {}
    for name, scale in value.items():
        if name not in offer.loras:
            raise RequestError(f"loras: unknown LoRA {_echo(name)}; this server has {loaded}")
        number = _finite(scale)
        if number is None:
            raise RequestError(f"loras: the scale of {name} must be a finite number, got {_kind(scale)} "
                               f"{_echo(scale)}")
        if abs(number) > MAX_LORA_SCALE:
            raise RequestError(f"loras: the scale of {name} must be between -{MAX_LORA_SCALE:g} and "
                               f"{MAX_LORA_SCALE:g}, got {_echo(scale)}")
        scales[name] = number
    return scales


# Extra features, by request field name: a validator that returns the normalised value or raises
# RequestError; hyvideo.server.worker.feature_kwargs turns them into sampler arguments.
FEATURE_FIELDS: dict[str, Callable[[Any, ServerOffer], Any]] = {
    "cache": _cache_policy,  # step cache policy for this job (README "Step caching")
    "cache_threshold": _cache_threshold,  # with "cache": its threshold (default: the policy's)
    "loras": _loras,  # scales of preloaded LoRAs for this job; the others keep their start-up scale
}

# Request field -> SamplingConfig field (size and seconds/frames expand to two/one fields, see parse).
SAMPLING_FIELDS = {
    "prompt": "prompts",
    "negative_prompt": "neg_prompt",
    "size": ("width", "height"),
    "seconds": "video_length",
    "frames": "video_length",
    "steps": "infer_steps",
    "seed": "seed",
    "guidance_scale": "cfg_scale",
    "embedded_guidance_scale": "embedded_cfg_scale",
    "flow_shift": "flow_shift",
    "n": "num_videos",
}
OTHER_FIELDS = ("model", "image")  # image: image-to-video servers only (parse_image)


@dataclass(frozen=True)
class JobRequest:
    """A validated request: every sampling value resolved (seed may stay None: drawn when the job runs)."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    frames: int
    steps: int
    seed: int | None
    guidance_scale: float
    embedded_guidance_scale: float
    flow_shift: float
    n: int
    features: dict[str, Any] = field(default_factory=dict)  # with an image: features["image"], its record
    # The checked reference image (I2V). Its bytes go to the store beside the job, never into the request
    # JSON (JobStore.add(image=...)); to_dict leaves them out.
    image: ReferenceImage | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def seconds(self) -> str:
        return f"{self.frames / FPS:.2f}".rstrip("0").rstrip(".")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(dataclasses.replace(self, image=None))
        del values["image"]
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> JobRequest:
        return cls(**values)

    def sampling_config(self, base: SamplingConfig, *, seed: int) -> SamplingConfig:
        """The server's sampling flags with this request's values (one prompt, a concrete seed)."""
        return dataclasses.replace(
            base, prompts=(self.prompt,), neg_prompt=self.negative_prompt, height=self.height,
            width=self.width,
            video_length=self.frames, infer_steps=self.steps, seed=seed, cfg_scale=self.guidance_scale,
            embedded_cfg_scale=self.embedded_guidance_scale, flow_shift=self.flow_shift, num_videos=self.n,
            batch_size=1,
        )


def parse_request(body: Any, defaults: SamplingConfig, limits: ServerLimits, *,
                  loras: Mapping[str, float] | None = None, i2v_resolution: str | None = None) -> JobRequest:
    """Check a JSON body (a dict) and resolve it against the server's defaults; raise RequestError.

    Args:
        loras: the server's preloaded LoRAs (name -> start-up scale), which the "loras" field may name.
        i2v_resolution: the --i2v-resolution of an image-to-video server (every job then needs "image",
            and its size is the image's bucket); None for a text-to-video server.
    """
    if not isinstance(body, Mapping):
        raise RequestError(f"the request body must be a JSON object, got {_kind(body)}")
    known = set(SAMPLING_FIELDS) | set(OTHER_FIELDS) | set(FEATURE_FIELDS)
    unknown = sorted(str(k) for k in body if k not in known)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
    model = body.get("model")
    if model is not None and model != MODEL_ID:
        raise RequestError(f"model must be {MODEL_ID!r} (the one this server serves), got {_echo(model)}")
    if "seconds" in body and "frames" in body:
        raise RequestError("give seconds or frames, not both")
    offer = ServerOffer(limits, dict(loras or {}), i2v_resolution)
    _check_i2v_fields(body, offer)
    width, height = _size(body.get("size"), defaults, limits) if i2v_resolution is None else (0, 0)
    steps = _int(body, "steps", defaults.infer_steps, 1, limits.max_steps)
    n = _int(body, "n", defaults.num_videos, 1, limits.max_videos)
    seed = _int(body, "seed", defaults.seed, 0, MAX_SEED) if body.get("seed") is not None else defaults.seed
    if "cache_threshold" in body and body.get("cache") in (None, "none"):
        raise RequestError('cache_threshold needs a step cache in the same request: add "cache": '
                           '"magcache", "teacache" or "fbcache"')
    frames, prompt = _frames(body, defaults, limits), _prompt(body.get("prompt"), limits)
    image, features = None, {name: check(body[name], offer) for name, check in FEATURE_FIELDS.items()
                             if name in body}
    if i2v_resolution is not None:  # last: the costliest check (decoding the image)
        if frames == 1:
            raise RequestError("frames: image-to-video makes videos; ask for 4k+1 > 1 frames (e.g. 65, 129)")
        image, (height, width) = _reference_image(body["image"], offer)
        features["image"] = {**image.record(), "bucket": [height, width], "resolution": i2v_resolution}
    return JobRequest(
        prompt=prompt, image=image,
        negative_prompt=_negative(body.get("negative_prompt"), limits),
        width=width, height=height, frames=frames, steps=steps, seed=seed,
        guidance_scale=_float(body, "guidance_scale", defaults.cfg_scale, *GUIDANCE_RANGE),
        embedded_guidance_scale=_float(body, "embedded_guidance_scale", defaults.embedded_cfg_scale,
                                       *GUIDANCE_RANGE),
        flow_shift=_float(body, "flow_shift", defaults.flow_shift, *FLOW_SHIFT_RANGE, open_low=True),
        n=n, features=features,
    )


def _check_i2v_fields(body: Mapping[str, Any], offer: ServerOffer) -> None:
    """The fields that depend on the server's mode: "image" on an I2V server only, and always there."""
    if offer.i2v_resolution is None:
        if "image" in body:
            raise RequestError("image: this server runs text-to-video; an image is only taken by a server "
                               "started with --i2v-mode")
        return
    if "image" not in body or body["image"] in (None, ""):
        raise RequestError('image is needed: this server runs image-to-video (--i2v-mode); send the first '
                           'frame as "image": "data:image/png;base64,..."')
    if body.get("size") is not None:
        # Refused, not ignored: a client asking for a size must learn it does not get it.
        raise RequestError(f"size: on this image-to-video server the video size is the "
                           f"{offer.i2v_resolution} bucket closest to the image's aspect ratio; "
                           "leave size out")
    if isinstance(body.get("prompt"), str) and "<image>" in body["prompt"]:
        raise RequestError("prompt must not contain the text <image> on an image-to-video server (the "
                           "LLaVA's image token)")


def _reference_image(value: Any, offer: ServerOffer) -> tuple[ReferenceImage, tuple[int, int]]:
    """The checked image and its video bucket (H, W), as the CLI's with_i2v_bucket picks it."""
    from hyvideo.i2v import bucket_for_image

    # The bucket is not held to --max-side: its area is fixed by --i2v-resolution (a long side of up to
    # 4x the short one costs no more pixels), as in the CLI.
    try:
        image, pixels = check_image(value, offer.limits)
        return image, bucket_for_image(pixels.height, pixels.width, offer.i2v_resolution)
    except ImageError as exc:
        raise RequestError(str(exc)) from None
    except ValueError as exc:  # no bucket fits (an extreme aspect ratio)
        raise RequestError(f"image: {exc}") from None


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _finite(value: Any) -> float | None:
    """A JSON number (not a boolean) as a finite float, else None.

    An integer too large for a float (JSON allows 400 digits) would make math.isfinite raise
    OverflowError, a 500 instead of a 400: it is refused here like inf and nan.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _echo(value: Any) -> str:
    """A client's value for an error message: its repr, cut short so that the message stays one line."""
    text = repr(value)
    return text if len(text) <= _ECHO_CHARS else text[:_ECHO_CHARS] + "..."


def _prompt(value: Any, limits: ServerLimits) -> str:
    if not isinstance(value, str):
        raise RequestError(f"prompt must be a string, got {_kind(value)}")
    if not value.strip():
        raise RequestError("prompt is empty: describe the video to generate")
    if len(value) > limits.max_prompt_chars:
        raise RequestError(f"prompt has {len(value)} characters; the limit is {limits.max_prompt_chars}")
    return value.strip()


def _negative(value: Any, limits: ServerLimits) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(f"negative_prompt must be a string, got {_kind(value)}")
    if len(value) > limits.max_prompt_chars:
        raise RequestError(f"negative_prompt has {len(value)} characters; the limit is "
                           f"{limits.max_prompt_chars}")
    return value.strip() or None


def _size(value: Any, defaults: SamplingConfig, limits: ServerLimits) -> tuple[int, int]:
    if value is None:
        width, height = defaults.width, defaults.height
    else:
        match = _SIZE.match(value) if isinstance(value, str) else None
        if match is None:
            raise RequestError(f"size must be a string 'WIDTHxHEIGHT' such as '1280x720', got {_echo(value)}")
        width, height = int(match.group(1)), int(match.group(2))
    for name, pixels in (("width", width), ("height", height)):
        if not 16 <= pixels <= limits.max_side:
            raise RequestError(f"size: {name} {pixels} is outside 16..{limits.max_side} pixels")
        if pixels % 16:
            raise RequestError(f"size: {name} {pixels} is not a multiple of 16 "
                               f"(e.g. {pixels + 16 - pixels % 16})")
    return width, height


def _frames(body: Mapping[str, Any], defaults: SamplingConfig, limits: ServerLimits) -> int:
    if "seconds" in body:
        value = body["seconds"]
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(f"seconds must be a whole number >= 1 (e.g. 5 or \"5\"), got {_echo(value)}")
        frames = value * FPS + 1  # 24 frames a second plus the first frame: always 4k+1
        if frames > limits.max_frames:
            raise RequestError(f"seconds {value} means {frames} frames; the limit is {limits.max_frames} "
                               f"({(limits.max_frames - 1) // FPS} s)")
        return frames
    frames = _int(body, "frames", defaults.video_length, 1, limits.max_frames)
    if (frames - 1) % 4:
        raise RequestError(f"frames must be 1 or 4k+1 (e.g. 65, 129), got {frames}")
    return frames


def _int(body: Mapping[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if name not in body or body[name] is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {_kind(value)} {_echo(value)}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(body: Mapping[str, Any], name: str, default: float, low: float, high: float,
           *, open_low: bool = False) -> float:
    if name not in body or body[name] is None:
        return default
    value = body[name]
    if _finite(value) is None:
        raise RequestError(f"{name} must be a number, got {_kind(value)} {_echo(value)}")
    if not (low < value if open_low else low <= value) or value > high:
        bracket = "(" if open_low else "["
        raise RequestError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value}")
    return float(value)
