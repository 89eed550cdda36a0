"""The argparse parser of sample_video.py: one-line errors, --help with defaults, every flag group."""

from __future__ import annotations

import argparse

from hyvideo.config.base_flags import (
    _add_denoise_schedule_args,
    _add_extra_models_args,
    _add_inference_args,
    _add_network_args,
)
from hyvideo.config.cache_flags import _add_cache_args
from hyvideo.config.i2v_flags import _add_i2v_args
from hyvideo.config.launch import launch_env
from hyvideo.config.lora_flags import _add_lora_args
from hyvideo.config.multigpu_flags import _add_multigpu_args, _add_parallel_args
from hyvideo.config.reliability_flags import _add_reliability_args
from hyvideo.config.rewrite_flags import _add_rewrite_args
from hyvideo.config.speed_memory_flags import _add_memory_args, _add_speed_args

EXAMPLES = """examples:
  python sample_video.py --prompt "A cat walks on the grass, realistic style." --video-size 544 960 \\
      --video-length 129 --seed 42 --model-base ckpts
  python sample_video.py --prompt-file prompts.txt --video-size 720 1280 --use-cpu-offload --use-fp8 \\
      --save-path ./results
"""


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad value in one line (flag + reason) and exits with status 2.

    Under torchrun every process detects the same error; only local rank 0 prints it, so a node shows
    the message once (the other processes exit with status 2 silently).
    """

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if _reports_errors() else None)


def _reports_errors() -> bool:
    try:
        return launch_env().reports_errors
    except ValueError:  # a malformed LOCAL_RANK: better every process than none
        return True


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the examples' line breaks."""


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(description="HunyuanVideo inference script", epilog=EXAMPLES,
                                 formatter_class=_HelpFormatter)
    _add_network_args(parser)
    _add_extra_models_args(parser)
    _add_denoise_schedule_args(parser)
    _add_inference_args(parser)
    _add_parallel_args(parser)
    _add_multigpu_args(parser)
    _add_rewrite_args(parser)
    _add_cache_args(parser)
    _add_lora_args(parser)
    _add_speed_args(parser)
    _add_memory_args(parser)
    _add_i2v_args(parser)
    _add_reliability_args(parser)
    return parser
