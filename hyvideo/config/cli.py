"""parse_args: the command line -> validated flags -> the frozen Configs the library uses."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from hyvideo.config.base_flags import NO_EFFECT_FLAGS, resolve_offload_mode
from hyvideo.config.cache_flags import cache_config_from_args
from hyvideo.config.i2v_flags import (
    dit_weight_arg,
    i2v_config_from_args,
    i2v_dit_config,
    i2v_model_paths,
    resolve_flow_shift,
)
from hyvideo.config.launch import launch_env
from hyvideo.config.lora_flags import lora_specs
from hyvideo.config.parser import _reports_errors, build_parser
from hyvideo.config.rewrite_flags import rewrite_config_from_args
from hyvideo.config.settings import Configs, ModelConfig, RuntimeConfig, SamplingConfig
from hyvideo.config.validation import validation_errors
from hyvideo.constants import HUNYUAN_VIDEO_CONFIG

# The name hyvideo/config.py's log lines always had (the log format shows it).
logger = logging.getLogger("hyvideo.config")


def video_hw(video_size: list[int] | tuple[int, ...]) -> tuple[int, int]:
    return (video_size[0], video_size[0]) if len(video_size) == 1 else (video_size[0], video_size[1])


def read_prompt_file(path: str) -> tuple[str, ...]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"--prompt-file {path}: cannot read it ({exc.strerror})") from exc
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 BOM (Windows Notepad) is fine
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # UTF-16 text decodes to NUL-ridden garbage or not at all
        raise ValueError(f"--prompt-file {path}: not a UTF-8 text file (binary or UTF-16?); save it as UTF-8 "
                         "with one prompt per line")
    lines = text.splitlines()
    prompts = tuple(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))
    if not prompts:
        raise ValueError(f"--prompt-file {path}: no prompts in it (one prompt per line)")
    return prompts


def configs_from_args(args: argparse.Namespace) -> Configs:
    """Turn a validated namespace into the frozen configs the library uses."""
    dit = HUNYUAN_VIDEO_CONFIG[args.model].with_updates(
        in_channels=args.latent_channels, out_channels=args.latent_channels,
        rope_theta=float(args.rope_theta), text_states_dim=args.text_states_dim,
        text_states_dim_2=args.text_states_dim_2,
    )
    i2v = i2v_config_from_args(args)
    if i2v.enabled:
        dit = i2v_dit_config(dit, i2v, args.latent_channels)
    model = ModelConfig(
        model=args.model, dit=dit, precision=args.precision, model_base=Path(args.model_base),
        dit_weight=dit_weight_arg(args), load_key=args.load_key,
        use_fp8=args.use_fp8, attn_backend=args.attn_backend, vae=args.vae,
        vae_precision=args.vae_precision, vae_tiling=args.vae_tiling, text_encoder=args.text_encoder,
        text_encoder_precision=args.text_encoder_precision, text_len=args.text_len,
        tokenizer=args.tokenizer, prompt_template=args.prompt_template,
        prompt_template_video=args.prompt_template_video,
        hidden_state_skip_layer=args.hidden_state_skip_layer, apply_final_norm=args.apply_final_norm,
        text_encoder_2=args.text_encoder_2, text_encoder_precision_2=args.text_encoder_precision_2,
        tokenizer_2=args.tokenizer_2, text_len_2=args.text_len_2, loras=lora_specs(args)[0],
        compile=args.compile, compile_mode=args.compile_mode, fp8_gemm=args.fp8_gemm,
        dit_chunk_tokens=args.dit_chunk_tokens, vae_tile_size=args.vae_tile_size,
        vae_tile_frames=args.vae_tile_frames, **i2v_model_paths(args),
    )
    if args.prompt_file is not None:
        prompts = read_prompt_file(args.prompt_file)
    else:
        prompts = (args.prompt.strip(),) if args.prompt is not None else ()
    height, width = video_hw(args.video_size)
    sampling = SamplingConfig(
        prompts=prompts, neg_prompt=args.neg_prompt, height=height, width=width,
        video_length=args.video_length, infer_steps=args.infer_steps, seed=args.seed,
        cfg_scale=args.cfg_scale, embedded_cfg_scale=args.embedded_cfg_scale,
        flow_shift=resolve_flow_shift(args),
        flow_reverse=args.flow_reverse, flow_solver=args.flow_solver, denoise_type=args.denoise_type,
        num_videos=args.num_videos, batch_size=args.batch_size,
    )
    save_path = f"{args.save_path}_{args.save_path_suffix}" if args.save_path_suffix else args.save_path
    env = launch_env()
    runtime = RuntimeConfig(
        save_path=Path(save_path), disable_autocast=args.disable_autocast,
        offload_mode=resolve_offload_mode(args),
        plan_memory=args.plan_memory, ulysses_degree=args.ulysses_degree,
        ring_degree=args.ring_degree, crf=args.crf, save_latents=args.save_latents,
        decode_latents=Path(args.decode_latents) if args.decode_latents else None,
        rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
        memory_check=not args.no_memory_check,
        cfg_parallel=args.cfg_parallel, shard_weights=args.shard_weights,
        local_world_size=env.local_world_size,
    )
    if runtime.auto_layout and not env.under_launcher:  # one process: 1 x 1, recorded as before
        runtime = dataclasses.replace(runtime, ulysses_degree=1, ring_degree=1)
    return Configs(model=model, sampling=sampling, runtime=runtime, rewrite=rewrite_config_from_args(args),
                   cache=cache_config_from_args(args), i2v=i2v)


def announce_adjustments(args: argparse.Namespace) -> None:
    """Log what the original changes silently: sizes rounded to 16, flags that have no effect."""
    height, width = video_hw(args.video_size)
    if height % 16 or width % 16:
        aligned = (-(-height // 16) * 16, -(-width // 16) * 16)
        logger.warning("--video-size %dx%d is not a multiple of 16; it will be rounded up to %dx%d",
                       height, width, *aligned)
    if args.neg_prompt is not None and not args.cfg_scale > 1.0:
        logger.warning("--neg-prompt has no effect without --cfg-scale > 1 (got %g): the negative branch "
                       "only runs with classifier-free guidance", args.cfg_scale)
    defaults = build_parser().parse_args([])
    if args.i2v_mode:
        if tuple(args.video_size) != tuple(defaults.video_size):
            logger.warning("--video-size is replaced in --i2v-mode by the --i2v-resolution %s bucket closest "
                           "to the image's aspect ratio", args.i2v_resolution)
    for name in NO_EFFECT_FLAGS:
        if getattr(args, name) != getattr(defaults, name):
            logger.warning("--%s has no effect (kept for compatibility with the original)",
                           name.replace("_", "-"))


def parse_args(argv: list[str] | None = None, *, require_prompt: bool = False) -> Configs:
    """Parse and validate the command line; bad values exit with status 2 and a one-line message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = validation_errors(args)
    nothing_to_sample = args.decode_latents is not None or args.plan_memory is not None
    if require_prompt and args.prompt is None and args.prompt_file is None and not nothing_to_sample:
        errors.append("--prompt (or --prompt-file) is required")
    if errors:
        parser.error("; ".join(errors))
    if _reports_errors():  # once per node under torchrun
        announce_adjustments(args)
    try:
        return configs_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    raise AssertionError("unreachable")  # parser.error exits
