"""Command-line flags and the typed configuration they become.

This package is the only code that sees the argparse namespace or reads environment variables. Every flag
of the original `hyvideo/config.py` is accepted with the same name, type, default and choices, so the
original's example commands run unchanged; the differences are listed in README.md ("Flag reference")
and marked `# Differs:` in the modules:

  settings.py            ModelConfig / SamplingConfig / RuntimeConfig / Configs, LoraSpec, checkpoint names
  launch.py              LaunchEnv: RANK / WORLD_SIZE / LOCAL_RANK from torchrun
  parser.py              build_parser: the one-line-error parser with every flag group
  base_flags.py          the original's groups: network, extra models, denoise schedule, inference
  multigpu_flags.py      --ulysses-degree / --ring-degree, --cfg-parallel, --shard-weights
  rewrite_flags.py       --prompt-rewrite, --rewrite-*
  cache_flags.py         --cache, --cache-*
  lora_flags.py          --lora, --lora-scale, --lora-ignore-alpha
  speed_memory_flags.py  --compile, --fp8-gemm, --dit-chunk-tokens, --vae-tile-*
  i2v_flags.py           --i2v-*
  reliability_flags.py   input bounds (MAX_*, SEED_LIMIT), --no-memory-check
  validation.py          validation_errors: every problem with the parsed flags
  cli.py                 configs_from_args, parse_args (sample_video.py)
  server.py              ServerConfig / ServerLimits, parse_server_args (gradio_server.py)

Everything is importable from `hyvideo.config` itself, as before the split.
"""

from __future__ import annotations

from hyvideo.config.base_flags import (
    ATTENTION_BACKENDS,
    NO_EFFECT_FLAGS,
    PRIMARY_ENCODERS,
    SECONDARY_ENCODERS,
    resolve_offload_mode,
)
from hyvideo.config.cache_flags import cache_config_from_args, cache_flag_errors
from hyvideo.config.cli import (
    announce_adjustments,
    configs_from_args,
    parse_args,
    read_prompt_file,
    video_hw,
)
from hyvideo.config.i2v_flags import (
    dit_weight_arg,
    i2v_config_from_args,
    i2v_dit_config,
    i2v_flag_errors,
    i2v_model_paths,
    resolve_flow_shift,
)
from hyvideo.config.launch import LaunchEnv, launch_env
from hyvideo.config.lora_flags import lora_specs, split_lora_arg
from hyvideo.config.multigpu_flags import multigpu_errors, parallel_layout_errors
from hyvideo.config.parser import EXAMPLES, build_parser
from hyvideo.config.reliability_flags import (
    MAX_INFER_STEPS,
    MAX_VIDEO_LENGTH,
    MAX_VIDEO_SIDE,
    MAX_VIDEOS_PER_PROMPT,
    SEED_LIMIT,
    reliability_errors,
)
from hyvideo.config.rewrite_flags import rewrite_config_from_args, rewrite_validation_errors
from hyvideo.config.server import (
    DEFAULT_SERVER_NAME,
    DEFAULT_SERVER_PORT,
    SERVER_TOKEN_ENV,
    ServerConfig,
    ServerLimits,
    build_server_parser,
    parse_server_args,
    server_validation_errors,
)
from hyvideo.config.settings import (
    DIT_FILE,
    DIT_FP8_FILE,
    DIT_SUBDIR,
    Configs,
    LoraSpec,
    ModelConfig,
    RuntimeConfig,
    SamplingConfig,
)
from hyvideo.config.speed_memory_flags import (
    VAE_TILE_FRAMES_MULTIPLE,
    VAE_TILE_SIZE_MULTIPLE,
    memory_args_errors,
    vae_tile_errors,
)
from hyvideo.config.validation import validation_errors

__all__ = [
    "ATTENTION_BACKENDS",
    "DEFAULT_SERVER_NAME",
    "DEFAULT_SERVER_PORT",
    "DIT_FILE",
    "DIT_FP8_FILE",
    "DIT_SUBDIR",
    "EXAMPLES",
    "MAX_INFER_STEPS",
    "MAX_VIDEOS_PER_PROMPT",
    "MAX_VIDEO_LENGTH",
    "MAX_VIDEO_SIDE",
    "NO_EFFECT_FLAGS",
    "PRIMARY_ENCODERS",
    "SECONDARY_ENCODERS",
    "SEED_LIMIT",
    "SERVER_TOKEN_ENV",
    "VAE_TILE_FRAMES_MULTIPLE",
    "VAE_TILE_SIZE_MULTIPLE",
    "Configs",
    "LaunchEnv",
    "LoraSpec",
    "ModelConfig",
    "RuntimeConfig",
    "SamplingConfig",
    "ServerConfig",
    "ServerLimits",
    "announce_adjustments",
    "build_parser",
    "build_server_parser",
    "cache_config_from_args",
    "cache_flag_errors",
    "configs_from_args",
    "dit_weight_arg",
    "i2v_config_from_args",
    "i2v_dit_config",
    "i2v_flag_errors",
    "i2v_model_paths",
    "launch_env",
    "lora_specs",
    "memory_args_errors",
    "multigpu_errors",
    "parallel_layout_errors",
    "parse_args",
    "parse_server_args",
    "read_prompt_file",
    "reliability_errors",
    "resolve_flow_shift",
    "resolve_offload_mode",
    "rewrite_config_from_args",
    "rewrite_validation_errors",
    "server_validation_errors",
    "split_lora_arg",
    "vae_tile_errors",
    "validation_errors",
    "video_hw",
]
