"""Generate videos from text prompts with HunyuanVideo.

    python sample_video.py --prompt "A cat walks on the grass, realistic style." --video-size 544 960

See README.md for every mode (one GPU, fp8, CPU offload, several GPUs with torchrun).
"""

from __future__ import annotations

import sys

from hyvideo.config import parse_args


def main(argv: list[str] | None = None) -> int:
    configs = parse_args(argv, require_prompt=True)
    # Heavy imports only after the flags are known to be valid, so --help and bad flags answer at once.
    try:
        from hyvideo.runner import run_cli
    except KeyboardInterrupt:  # Ctrl-C while torch imports: nothing to clean up yet
        print("sample_video.py: interrupted by SIGINT (Ctrl-C)", file=sys.stderr)
        return 130
    return run_cli(configs)


if __name__ == "__main__":
    sys.exit(main())
