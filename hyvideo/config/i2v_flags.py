"""The image-to-video flags (--i2v-*) and what they change in the model and sampling settings."""

from __future__ import annotations

import argparse
from pathlib import Path

from hyvideo.constants import DiTConfig
from hyvideo.i2v.image import I2V_RESOLUTIONS
from hyvideo.i2v.settings import (
    I2V_CONDITION_TYPES,
    I2V_DIT_SUBDIR,
    I2V_FLOW_SHIFT,
    I2V_TEXT_ENCODER_SUBDIR,
    T2V_FLOW_SHIFT,
    I2VConfig,
)


def _add_i2v_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Image-to-video args (HunyuanVideo-I2V)")
    group.add_argument("--i2v-mode", action="store_true",
                       help="Image-to-video: animate --i2v-image-path (needs the HunyuanVideo-I2V weights).")
    group.add_argument("--i2v-image-path", type=str, default=None,
                       help="The reference image (PNG/JPEG/WebP; RGBA and greyscale become RGB).")
    group.add_argument("--i2v-resolution", type=str, default="720p", choices=sorted(I2V_RESOLUTIONS),
                       help="Bucket size; the bucket closest to the image's aspect replaces --video-size.")
    group.add_argument("--i2v-condition-type", type=str, default="token_replace", choices=I2V_CONDITION_TYPES,
                       help="token_replace: the current checkpoint; latent_concat: the first (33-channel) "
                            "one.")
    group.add_argument("--i2v-stability", action="store_true",
                       help="Start from 0.999 noise + 0.001 image latents (the 'stable' recipe, with "
                            "--flow-shift 7).")
    group.add_argument("--i2v-dit-weight", type=str, default=None,
                       help="I2V DiT weights (default: <model-base>/hunyuan-video-i2v-720p/transformers/"
                            "mp_rank_00_model_states.pt).")
    # The I2V repository's LoRA flags, mapped onto --lora with alpha ignored (its effect LoRAs need that).
    group.add_argument("--use-lora", action="store_true", help="I2V repository spelling: apply --lora-path.")
    group.add_argument("--lora-path", type=str, default=None,
                       help="I2V repository spelling of --lora PATH --lora-ignore-alpha (with --use-lora).")


def i2v_flag_errors(args: argparse.Namespace, *, image_flag_required: bool = True) -> list[str]:
    """Problems with the --i2v-* flags (the image itself is checked when it is loaded).

    `image_flag_required=False` (the server): --i2v-mode without --i2v-image-path is fine.
    """
    errors = []
    given = [f for f in ("i2v_image_path", "i2v_dit_weight") if getattr(args, f) is not None]
    if not args.i2v_mode:
        given += ["i2v_stability"] if args.i2v_stability else []
        if given:
            errors.append(f"--{given[0].replace('_', '-')} needs --i2v-mode")
    elif args.i2v_image_path is None:
        if image_flag_required:
            errors.append("--i2v-mode needs --i2v-image-path IMAGE (the first frame to animate)")
    elif not Path(args.i2v_image_path).is_file():
        errors.append(f"--i2v-image-path {args.i2v_image_path}: no such file")
    if args.use_lora != (args.lora_path is not None):
        errors.append("--use-lora and --lora-path go together (or use --lora PATH --lora-ignore-alpha)")
    if args.i2v_mode and args.prompt is not None and "<image>" in args.prompt:
        errors.append("--prompt must not contain the text <image> in --i2v-mode (the LLaVA's image token)")
    if args.i2v_mode and args.video_length == 1:
        errors.append("--i2v-mode makes videos: --video-length must be 4k+1 > 1 (e.g. 129)")
    return errors


def i2v_config_from_args(args: argparse.Namespace) -> I2VConfig:
    return I2VConfig(
        enabled=args.i2v_mode, image_path=Path(args.i2v_image_path) if args.i2v_image_path else None,
        resolution=args.i2v_resolution, condition_type=args.i2v_condition_type, stability=args.i2v_stability,
    )


def i2v_dit_config(dit: DiTConfig, i2v: I2VConfig, latent_channels: int) -> DiTConfig:
    """The I2V DiT: T2V-cfgdistill + token replace, or the legacy latent_concat checkpoint (33 input
    channels = latents + image latents + mask, and no guidance_in)."""
    if i2v.condition_type == "latent_concat":
        return dit.with_updates(in_channels=2 * latent_channels + 1, guidance_embed=False,
                                image_condition_type="latent_concat")
    return dit.with_updates(image_condition_type="token_replace")


def i2v_model_paths(args: argparse.Namespace) -> dict:
    """ModelConfig fields that move to the I2V checkpoint folders in --i2v-mode (none otherwise)."""
    if not args.i2v_mode:
        return {}
    return {"dit_subdir": I2V_DIT_SUBDIR, "text_encoder_subdir": I2V_TEXT_ENCODER_SUBDIR}


def dit_weight_arg(args: argparse.Namespace) -> Path | None:
    """--dit-weight, or --i2v-dit-weight in --i2v-mode; None: the official file under --model-base."""
    weight = (args.i2v_dit_weight if args.i2v_mode else None) or args.dit_weight
    return Path(weight) if weight else None


def resolve_flow_shift(args: argparse.Namespace) -> float:
    if args.flow_shift is not None:
        return args.flow_shift
    return I2V_FLOW_SHIFT if args.i2v_mode else T2V_FLOW_SHIFT
