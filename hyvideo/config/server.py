"""gradio_server.py's command line: the CLI's flags (the defaults of every job) plus the server's own."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from hyvideo.config.cli import configs_from_args
from hyvideo.config.parser import build_parser
from hyvideo.config.settings import Configs
from hyvideo.config.validation import validation_errors

SERVER_TOKEN_ENV = "HYVIDEO_SERVER_TOKEN"  # bearer token for /v1 and the page's login; never a flag
DEFAULT_SERVER_NAME = "127.0.0.1"  # Differs: the original binds 0.0.0.0 (every interface, no auth)
DEFAULT_SERVER_PORT = 8081


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; larger requests get a 4xx answer, never a job."""

    max_steps: int = 100
    max_side: int = 1280  # pixels, height and width each
    max_frames: int = 129
    max_videos: int = 4  # videos per job
    max_queue: int = 32  # jobs queued or running at once
    max_prompt_chars: int = 2000
    # Image-to-video reference images (request field "image"). 20 MB of encoded bytes holds any sensible
    # photo (a 4096 px JPEG/WebP is a few MB, a PNG rarely more) while bounding what one request makes the
    # server hold, decode and store in its queue; 4096 px a side: the video's bucket is at most 1920 px
    # long, so a larger image only costs decode time and memory (the side is read from the header, before
    # decoding, which also stops decompression bombs).
    max_image_bytes: int = 20_000_000
    max_image_side: int = 4096


@dataclass(frozen=True)
class ServerConfig:
    """Where the server listens, who may use it, and the limits of a job."""

    host: str
    port: int
    token: str | None  # from $HYVIDEO_SERVER_TOKEN; None: no authentication
    limits: ServerLimits
    model_base_given: bool  # False: --model-base was left at its default (tiny-tree fallback allowed)


LIMIT_NAMES = tuple(f.name for f in dataclasses.fields(ServerLimits))


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Server args (gradio_server.py)")
    group.add_argument("--server-name", type=str, default=None,
                       help=f"Interface to bind (default: $SERVER_NAME or {DEFAULT_SERVER_NAME}; 0.0.0.0 "
                            f"exposes the server to the network: set ${SERVER_TOKEN_ENV} then).")
    group.add_argument("--server-port", type=int, default=None,
                       help=f"Port (default: $SERVER_PORT or {DEFAULT_SERVER_PORT}).")
    limits = ServerLimits()
    for name, help_text in (("max_steps", "denoising steps"), ("max_side", "pixels of height or width"),
                            ("max_frames", "frames"), ("max_videos", "videos per job"),
                            ("max_queue", "jobs queued or running at once"),
                            ("max_prompt_chars", "characters of a prompt"),
                            ("max_image_bytes", "bytes of an --i2v-mode request's image (decoded)"),
                            ("max_image_side", "pixels of a side of an --i2v-mode request's image")):
        group.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(limits, name),
                           help=f"Largest number of {help_text} a request may ask for.")


def build_server_parser() -> argparse.ArgumentParser:
    """The CLI's flags (defaults of every job) plus the server's own."""
    parser = build_parser()
    parser.description = "HunyuanVideo web page and /v1/videos API"
    # Parity: the original's page writes to ./gradio_outputs.
    parser.set_defaults(save_path="./gradio_outputs")
    _add_server_args(parser)
    return parser


def server_validation_errors(args: argparse.Namespace) -> list[str]:
    errors = []
    for name in LIMIT_NAMES:
        if getattr(args, name) < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.i2v_mode and args.i2v_image_path is not None:
        errors.append("--i2v-image-path is not a server flag: each request sends its image (field "
                      "\"image\", a data URL); leave the flag out")
    if args.server_port is not None and not 0 < args.server_port < 65536:
        errors.append(f"--server-port must be between 1 and 65535, got {args.server_port}")
    return errors


def parse_server_args(argv: list[str] | None = None) -> tuple[Configs, ServerConfig]:
    """Parse gradio_server.py's command line; bad values exit with status 2 and a one-line message."""
    parser = build_server_parser()
    args = parser.parse_args(argv)
    # The CLI's --i2v-mode animates one --i2v-image-path; the server takes an image per request instead.
    errors = validation_errors(args, image_flag_required=False)
    errors += server_validation_errors(args)
    port = args.server_port
    if port is None:
        raw = os.environ.get("SERVER_PORT", "").strip() or str(DEFAULT_SERVER_PORT)
        port = int(raw) if raw.isdigit() else -1
        if not 0 < port < 65536:
            errors.append(f"environment variable SERVER_PORT={raw!r} is not a port number (1-65535)")
    if errors:
        parser.error("; ".join(errors))
    limits = ServerLimits(**{name: getattr(args, name) for name in LIMIT_NAMES})
    server = ServerConfig(
        host=args.server_name or os.environ.get("SERVER_NAME", "").strip() or DEFAULT_SERVER_NAME,
        port=port, token=os.environ.get(SERVER_TOKEN_ENV, "").strip() or None, limits=limits,
        model_base_given=args.model_base != build_parser().get_default("model_base"),
    )
    try:
        return configs_from_args(args), server
    except ValueError as exc:
        parser.error(str(exc))
    raise AssertionError("unreachable")  # parser.error exits
