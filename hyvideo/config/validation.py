"""Every problem with the parsed flags, as one-line messages naming the flag."""

from __future__ import annotations

import argparse
import math

from hyvideo.config.cache_flags import cache_flag_errors
from hyvideo.config.i2v_flags import i2v_flag_errors
from hyvideo.config.lora_flags import lora_specs
from hyvideo.config.multigpu_flags import multigpu_errors
from hyvideo.config.reliability_flags import reliability_errors
from hyvideo.config.rewrite_flags import rewrite_validation_errors
from hyvideo.config.speed_memory_flags import memory_args_errors
from hyvideo.constants import VAE_LATENT_CHANNELS
from hyvideo.modules.attention import attention_backend_problem


def validation_errors(args: argparse.Namespace, *, image_flag_required: bool = True) -> list[str]:
    """Every problem with the parsed flags, as one-line messages naming the flag.

    `image_flag_required=False`: the server, whose --i2v-mode takes the image per request.
    """
    errors = []
    size = args.video_size
    if len(size) not in (1, 2):
        errors.append(f"--video-size takes 1 or 2 values (height width), got {len(size)}")
    elif min(size) <= 0:
        errors.append(f"--video-size must be positive, got {' '.join(map(str, size))}")
    if args.video_length < 1 or (args.video_length - 1) % 4 != 0:
        errors.append(f"--video-length must be 1 or 4k+1 (e.g. 65, 129), got {args.video_length}")
    positive = ("infer_steps", "num_videos", "batch_size", "ulysses_degree", "ring_degree", "text_len",
                "text_len_2", "rope_theta", "text_states_dim", "text_states_dim_2")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.flow_shift is not None and math.isfinite(args.flow_shift) and args.flow_shift <= 0:
        errors.append(f"--flow-shift must be > 0, got {args.flow_shift}")
    if args.hidden_state_skip_layer < 0:
        errors.append(f"--hidden-state-skip-layer must be >= 0, got {args.hidden_state_skip_layer}")
    if not 0 <= args.crf <= 51:
        errors.append(f"--crf must be between 0 and 51, got {args.crf}")
    if args.latent_channels != VAE_LATENT_CHANNELS[args.vae]:
        errors.append(f"--latent-channels {args.latent_channels} must match the VAE's "
                      f"{VAE_LATENT_CHANNELS[args.vae]} channels of --vae {args.vae}")
    if args.prompt is not None and args.prompt_file is not None:
        errors.append("--prompt and --prompt-file are mutually exclusive: give one")
    if args.prompt is not None and not args.prompt.strip():
        errors.append("--prompt is empty")
    errors += rewrite_validation_errors(args)
    errors += lora_specs(args)[1] + i2v_flag_errors(args, image_flag_required=image_flag_required)
    if args.fp8_gemm and not args.use_fp8:
        errors.append("--fp8-gemm multiplies the fp8 weights directly: add --use-fp8")
    # Not for --plan-memory / --decode-latents: they run no attention (a plan may be made on a laptop).
    problem = None
    if args.plan_memory is None and args.decode_latents is None:
        problem = attention_backend_problem(args.attn_backend)
    if problem:
        errors.append(f"--attn-backend {args.attn_backend}: {problem}")
    errors += memory_args_errors(args)
    errors += reliability_errors(args)
    errors += multigpu_errors(args)
    return errors + cache_flag_errors(args)
