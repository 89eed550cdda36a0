"""Writing results to disk: video frames, mp4 encoding, file names, JSON sidecars and latent files.

Every writer is atomic: it writes a hidden temporary file in the target directory and publishes it under
the final name only after it was written completely, so an interrupted run (error, Ctrl-C) never leaves a
truncated video or JSON behind. By default writers also refuse to replace an existing file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import logging
import math
import os
import secrets
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data_utils import make_grid

logger = logging.getLogger(__name__)

# Upstream used "%Y-%m-%d-%H:%M:%S"; ':' is illegal in Windows file names, so we use '-' throughout.
TIME_FLAG_FORMAT = "%Y-%m-%d-%H-%M-%S"
# Default x264 CRF: visually close to lossless. Upstream's imageio default (quality 5) means CRF 25.
DEFAULT_CRF = 17
# Stem budget in UTF-8 bytes: leaves room for "_NN" de-duplication, the longest suffix we write
# (".safetensors") and the 255-byte file-name limit of ext4/NTFS/APFS.
MAX_STEM_BYTES = 200
LATENTS_FORMAT = "hyvideo-latents/1"
X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo",
)  # fmt: skip

# Characters that are illegal in Windows file names (and '/' everywhere).
_ILLEGAL_CHARS = frozenset('<>:"/\\|?*')
# Control, format (bidi overrides, zero-width) and surrogate code points never go into a file name.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})


# --------------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------------


def video_to_uint8_frames(videos: torch.Tensor) -> np.ndarray:
    """Convert decoded videos to uint8 RGB frames, tiling a batch vertically like upstream's save_videos_grid.

    Args:
        videos: (B, 3, T, H, W) or (3, T, H, W) floats in [0, 1] (values outside are clamped).

    Returns:
        (T, H', W', 3) uint8 array; H' = H and W' = W for a single video, otherwise
        H' = B·(H+2)+2 and W' = W+4 (2-pixel black padding, as torchvision.utils.make_grid(nrow=1)).
    """
    if videos.ndim == 4:
        videos = videos.unsqueeze(0)
    if videos.ndim != 5 or videos.shape[1] not in (1, 3):
        raise ValueError(f"Expected a (B, 3, T, H, W) video tensor, got shape {tuple(videos.shape)}.")
    if not videos.is_floating_point():
        raise ValueError(f"Expected float pixel values in [0, 1], got dtype {videos.dtype}.")
    # Parity: upstream converts in float32 on the CPU.
    videos = videos.detach().to(device="cpu", dtype=torch.float32)
    frames: np.ndarray | None = None
    for t in range(videos.shape[2]):
        grid = make_grid(videos[:, :, t], nrow=1, padding=2)  # (3, H', W')
        # Parity: clamp to [0, 1], then truncate x·255 (numpy astype(uint8)), not round.
        frame = (grid.permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8)  # (H', W', 3)
        if frames is None:
            frames = np.empty((videos.shape[2], *frame.shape), dtype=np.uint8)
        frames[t] = frame.numpy()
    assert frames is not None  # T >= 1 is guaranteed by a non-empty tensor
    return frames


# --------------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------------


def make_time_flag(when: _dt.datetime | None = None) -> str:
    """Local time as "%Y-%m-%d-%H-%M-%S" (upstream's format with '-' instead of the Windows-illegal ':')."""
    return (when or _dt.datetime.now()).strftime(TIME_FLAG_FORMAT)


def safe_filename(
    prompt: str,
    *,
    seed: int,
    time_flag: str | None = None,
    max_len: int = MAX_STEM_BYTES,
) -> str:
    """File stem "{time_flag}_seed{seed}_{prompt}" that is safe on Linux, macOS and Windows.

    Path separators, characters illegal on Windows and control/format characters are removed, runs of
    whitespace (newlines, tabs) become one space, and the result is cut to `max_len` UTF-8 *bytes*
    (never inside a character), so CJK prompts cannot exceed the 255-byte file-name limit. An empty
    prompt becomes "untitled". The stem has no extension: add one with `unique_path`.

    Args:
        prompt: the user's prompt.
        seed: the video's seed.
        time_flag: timestamp text; None uses `make_time_flag()` (now).
        max_len: maximum stem length in UTF-8 bytes.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    flag = _clean_name_part(make_time_flag() if time_flag is None else time_flag.replace(":", "-"))
    prefix = f"{flag}_seed{seed}_"
    budget = max_len - len(prefix.encode("utf-8"))
    if budget < len("untitled"):
        raise ValueError(f"max_len={max_len} bytes leaves no room for the prompt after {prefix!r}.")
    # Parity: upstream kept the first 100 characters of the prompt.
    text = _clean_name_part(prompt)[:100]
    text = _truncate_utf8(text, budget).rstrip(" .")
    return prefix + (text or "untitled")


def unique_path(
    directory: str | os.PathLike,
    stem: str,
    suffix: str,
    *,
    sibling_suffixes: Sequence[str] = (),
) -> Path:
    """First free path `directory/{stem}{suffix}`, then `{stem}_1{suffix}`, `{stem}_2{suffix}`, ...

    A candidate counts as taken if the file exists with `suffix` or with any of `sibling_suffixes`
    (e.g. (".json", ".safetensors") so a video, its sidecar and its latents share one free stem).
    """
    if not stem or "/" in stem or "\\" in stem or stem in (".", ".."):
        raise ValueError(f"stem must be a plain file name without path separators, got {stem!r}.")
    suffixes = [_normalise_suffix(s) for s in (suffix, *sibling_suffixes)]
    directory = Path(directory)
    index = 0
    while True:
        candidate = stem if index == 0 else f"{stem}_{index}"
        if not any(os.path.lexists(directory / f"{candidate}{s}") for s in suffixes):
            return directory / f"{candidate}{suffixes[0]}"
        index += 1


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove it is writable (write and delete a probe file).

    Call this before loading models so a bad --save-path fails in seconds, not after sampling.

    Raises:
        ValueError: naming the path, if it cannot be created or written.
    """
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise ValueError(f"Output path {directory} exists but is not a directory; choose another.") from err
    except OSError as err:
        raise ValueError(
            f"Cannot create output directory {directory}: {err.strerror or err}. Choose a writable location."
        ) from err
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".hyvideo-write-test-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(b"ok")
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"Output directory {directory} is not writable: {err.strerror or err}. Choose another location."
        ) from err
    return directory


def _clean_name_part(text: str) -> str:
    kept = []
    for ch in unicodedata.normalize("NFC", text):
        if ch.isspace():
            kept.append(" ")
        elif ch not in _ILLEGAL_CHARS and unicodedata.category(ch) not in _DROPPED_CATEGORIES:
            kept.append(ch)
    # Collapse whitespace; leading/trailing dots and spaces are hidden or illegal on some systems.
    return " ".join("".join(kept).split()).strip(" .")


def _truncate_utf8(text: str, max_bytes: int) -> str:
    # Cutting the encoded bytes and dropping a torn trailing character never splits a code point.
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _normalise_suffix(suffix: str) -> str:
    return suffix if not suffix or suffix.startswith(".") else f".{suffix}"


# --------------------------------------------------------------------------------------------------
# Atomic publication
# --------------------------------------------------------------------------------------------------


@contextmanager
def _atomic_target(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden temporary path next to `path`; publish it as `path` only if the block succeeds."""
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"Directory {path.parent} does not exist; create it first (see check_writable_dir)."
        )
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (use unique_path).")
    tmp = _reserve_temp_path(path)
    try:
        yield tmp
        _publish(tmp, path, overwrite=overwrite)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a partial file behind.
        tmp.unlink(missing_ok=True)
        raise


def _reserve_temp_path(path: Path) -> Path:
    # os.open with 0o666 honours the umask (mkstemp would make the final file owner-only, 0o600).
    stem = _truncate_utf8(path.stem, 100)
    for _ in range(100):
        tmp = path.with_name(f".{stem}.{secrets.token_hex(4)}.partial{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"Could not create a temporary file next to {path}.")


def _publish(tmp: Path, path: Path, *, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # link() fails if `path` exists, so a concurrent writer can never be clobbered.
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (use unique_path).") from None
    except OSError:
        # File systems without hard links (FAT, some network mounts): check, then rename.
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; refusing to overwrite it.") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _atomic_write_bytes(path: Path, data: bytes, *, overwrite: bool) -> Path:
    with _atomic_target(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return path


# --------------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------------


def save_video(
    video: torch.Tensor | np.ndarray | Iterable[np.ndarray],
    path: str | os.PathLike,
    *,
    fps: float = 24,
    crf: float = DEFAULT_CRF,
    preset: str = "medium",
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Encode frames to an H.264 mp4 (libx264, yuv420p, BT.709) with ffmpeg from imageio-ffmpeg, atomically.

    Args:
        video: a float tensor (B, 3, T, H, W) / (3, T, H, W) in [0, 1] (converted with
            `video_to_uint8_frames`), a uint8 array/tensor (T, H, W, 3), or an iterable of uint8 (H, W, 3)
            frames. H and W must be even (yuv420p).
        path: destination ".mp4"; its directory must exist.
        fps: frames per second (upstream: 24).
        crf: x264 constant rate factor, 0 (lossless) to 51 (worst); lower is better and larger.
        preset: x264 speed/size trade-off.
        metadata: container tags (e.g. {"comment": prompt}).
        overwrite: replace an existing file instead of raising FileExistsError.

    Returns:
        The written path. Nothing is left at `path` (or in its directory) if encoding fails.
    """
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"save_video writes mp4 files; use a '.mp4' path, got {str(path)!r}.")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}.")
    if isinstance(crf, bool) or not isinstance(crf, (int, float)) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be a number in [0, 51] (17 ≈ visually lossless), got {crf!r}.")
    if preset not in X264_PRESETS:
        raise ValueError(f"Unknown x264 preset {preset!r}; choose one of {', '.join(X264_PRESETS)}.")
    frames = iter(_iter_frames(video))
    first = next(frames, None)
    if first is None:
        raise ValueError("The video has no frames; nothing to save.")
    height, width = _check_frame(first, index=0, size=None)
    if height % 2 or width % 2:
        raise ValueError(
            f"yuv420p mp4 needs an even frame width and height, got {height}x{width} (HxW); crop or pad the "
            "frames (the sampler's sizes are multiples of 16)."
        )
    cmd = _ffmpeg_command(width, height, fps=fps, crf=crf, preset=preset, metadata=metadata)
    with _atomic_target(path, overwrite=overwrite) as tmp:
        num_frames = _run_ffmpeg([*cmd, str(tmp)], first, frames, size=(height, width))
    logger.info("Saved %dx%dx%d (HxWxframes, %s fps, crf %s) to %s", height, width, num_frames, fps, crf,
                path)
    return path


def _iter_frames(video: torch.Tensor | np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(video, torch.Tensor):
        if video.is_floating_point():
            yield from video_to_uint8_frames(video)
            return
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray) and video.ndim != 4:
        raise ValueError(
            f"Expected uint8 frames shaped (T, H, W, 3), got an array of shape {video.shape}; float "
            "videos (B, 3, T, H, W) should be passed as torch tensors."
        )
    yield from video


def _check_frame(frame: Any, *, index: int, size: tuple[int, int] | None) -> tuple[int, int]:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        kind = getattr(frame, "dtype", type(frame).__name__)
        raise ValueError(
            f"Frame {index} must be a uint8 numpy array (H, W, 3), got {kind}; convert float videos with "
            "video_to_uint8_frames."
        )
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"Frame {index} must be RGB shaped (H, W, 3), got {frame.shape}.")
    if size is not None and frame.shape[:2] != size:
        raise ValueError(f"Frame {index} has size {frame.shape[:2]}, but the first frame has {size}.")
    return frame.shape[0], frame.shape[1]


def _ffmpeg_command(
    width: int, height: int, *, fps: float, crf: float, preset: str, metadata: Mapping[str, str] | None
) -> list[str]:
    import imageio_ffmpeg  # deferred: locating the ffmpeg binary is only needed when saving

    rate = str(Fraction(fps).limit_denominator(1_000_000))
    # Convert with the BT.709 matrix and tag it: players assume BT.709 for untagged HD video, while
    # ffmpeg's default RGB->YUV matrix is BT.601 (upstream's slight colour shift).
    color = "scale=out_color_matrix=bt709:out_range=tv,setparams=range=tv:colorspace=bt709:"
    color += "color_primaries=bt709:color_trc=bt709"
    tags: list[str] = []
    for key, value in (metadata or {}).items():
        if not key.isidentifier():
            raise ValueError(f"Metadata keys must be simple identifiers, got {key!r}.")
        tags += ["-metadata", f"{key}={value}"]
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", rate, "-i", "-",
        "-an", "-vf", color, "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
        *tags, "-movflags", "+faststart+use_metadata_tags", "-f", "mp4",
    ]  # fmt: skip


def _run_ffmpeg(
    cmd: list[str], first: np.ndarray, rest: Iterator[np.ndarray], *, size: tuple[int, int]
) -> int:
    """Pipe the frames into ffmpeg; return the frame count, raise RuntimeError if ffmpeg fails."""
    logger.debug("Running %s", " ".join(cmd))
    # Own session/process group: Ctrl-C reaches only Python, which then kills ffmpeg and cleans up.
    detach = (
        {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        if sys.platform == "win32"
        else {"start_new_session": True}
    )
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full stderr pipe could deadlock
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, **detach)
        count, complete = 0, False
        try:
            for frame in _chain_checked(first, rest, size=size):
                proc.stdin.write(np.ascontiguousarray(frame).data)
                count += 1
            proc.stdin.close()
            returncode, complete = proc.wait(), True
        except BrokenPipeError:
            returncode = proc.wait()  # ffmpeg exited before taking every frame; its log says why
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
        if returncode != 0 or not complete:
            log.seek(0)
            message = log.read().decode("utf-8", errors="replace").strip()[-2000:]
            raise RuntimeError(f"ffmpeg failed with exit code {returncode}: {message or '(no output)'}")
    return count


def _chain_checked(
    first: np.ndarray, rest: Iterator[np.ndarray], *, size: tuple[int, int]
) -> Iterator[np.ndarray]:
    yield first
    for index, frame in enumerate(rest, start=1):
        _check_frame(frame, index=index, size=size)
        yield frame


# --------------------------------------------------------------------------------------------------
# Sidecar JSON and latents
# --------------------------------------------------------------------------------------------------


def write_sidecar(path: str | os.PathLike, payload: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Write `payload` as UTF-8 JSON next to a video: same stem, ".json" (pass the video's path).

    Tuples, Paths, dtypes, numpy/torch scalars, small tensors, enums, dataclasses and datetimes are
    converted to JSON values. Returns the JSON path.
    """
    path = Path(path)
    json_path = path.with_suffix(".json") if path.suffix else path.with_name(f"{path.name}.json")
    text = strict_json_dumps(dict(payload), indent=2) + "\n"
    return _atomic_write_bytes(json_path, text.encode("utf-8"), overwrite=overwrite)


def save_latents(
    path: str | os.PathLike,
    latents: torch.Tensor,
    metadata: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save denoised latents (e.g. (B, 16, T', H/8, W/8)) to a .safetensors file for decoding later.

    `metadata` (JSON-serialisable, converted like `write_sidecar`) is stored as a JSON string in the
    safetensors header. The tensor keeps its dtype and is moved to the CPU.
    """
    from safetensors.torch import save as safetensors_save

    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"latents must be a torch.Tensor, got {type(latents).__name__}.")
    header = {
        "format": "pt",
        "hyvideo_format": LATENTS_FORMAT,
        "hyvideo_metadata": strict_json_dumps(dict(metadata or {})),
    }
    data = safetensors_save({"latents": latents.detach().cpu().contiguous()}, metadata=header)
    return _atomic_write_bytes(Path(path), data, overwrite=overwrite)


def load_latents(
    path: str | os.PathLike, *, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load latents written by `save_latents`; returns (latents, metadata).

    Raises:
        FileNotFoundError: if `path` is not a file.
        ValueError: if the file is not a safetensors file written by `save_latents`.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Latent file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            header = handle.metadata() or {}
            if header.get("hyvideo_format") != LATENTS_FORMAT or "latents" not in handle.keys():
                raise ValueError(
                    f"{path} is not a hyvideo latent file (expected format {LATENTS_FORMAT!r} and a "
                    "'latents' tensor, as written by save_latents)."
                )
            latents = handle.get_tensor("latents")
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        metadata = json.loads(header.get("hyvideo_metadata", "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} has corrupt hyvideo metadata: {err}") from err
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} has corrupt hyvideo metadata: expected a JSON object.")
    return latents, metadata


def strict_json_dumps(payload: Any, *, indent: int | None = None) -> str:
    """JSON that every parser accepts: NaN and +-inf (not JSON) become the strings "NaN", "Infinity" and
    "-Infinity"; other values are converted like `write_sidecar` says."""
    return json.dumps(_finite(payload), ensure_ascii=False, indent=indent, allow_nan=False,
                      default=lambda value: _finite(_to_jsonable(value)))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _to_jsonable(value: Any) -> Any:
    """json.dumps `default` hook for the types our payloads carry."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (np.dtype, torch.device)):
        return str(value)
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        numel = value.numel() if isinstance(value, torch.Tensor) else np.size(value)
        if numel > 4096:
            raise TypeError(f"Refusing to write a {numel}-element array into JSON; save it separately.")
        return value.tolist()
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serialisable: {value!r}")
