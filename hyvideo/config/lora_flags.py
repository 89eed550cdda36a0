"""--lora, --lora-scale and --lora-ignore-alpha (plus the I2V repository's --use-lora --lora-path)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from hyvideo.config.settings import LoraSpec


def _add_lora_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA args")
    group.add_argument("--lora", type=str, action="append", default=None, metavar="PATH[:SCALE]",
                       help="A LoRA .safetensors file (diffusers, original or kohya keys) applied to the "
                            "DiT; repeat for several. PATH:SCALE sets its scale (default 1.0).")
    group.add_argument("--lora-scale", type=float, action="append", default=None, metavar="S",
                       help="Scale of the LoRAs, one per --lora in the same order (default 1.0 each).")
    group.add_argument("--lora-ignore-alpha", action="store_true",
                       help="Scale the LoRAs by --lora-scale alone, ignoring their stored alpha (as "
                            "HunyuanVideo-I2V does for its effect LoRAs).")


def split_lora_arg(text: str) -> tuple[str, float | None]:
    """'PATH:SCALE' -> (PATH, SCALE); a PATH without a numeric ':SCALE' tail -> (PATH, None)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, None


def lora_specs(args: argparse.Namespace) -> tuple[tuple[LoraSpec, ...], list[str]]:
    """The --lora / --lora-scale flags as LoraSpecs, and the problems with them (one line each)."""
    paths, scales = list(args.lora or []), args.lora_scale or []
    # The I2V repository's --use-lora --lora-path: one more --lora, with alpha ignored like its loader.
    own_flags = len(paths)
    if getattr(args, "use_lora", False) and getattr(args, "lora_path", None):
        paths.append(args.lora_path)
    errors, specs = [], []
    if len(scales) > len(paths):
        errors.append(f"--lora-scale given {len(scales)} times but --lora {len(paths)} times: give at most "
                      "one --lora-scale per --lora")
    for index, text in enumerate(paths):
        path, scale = split_lora_arg(text)
        if scale is not None and index < len(scales):
            errors.append(f"--lora {text} has a scale and also gets --lora-scale {scales[index]}: give one")
        scale = scale if scale is not None else (scales[index] if index < len(scales) else 1.0)
        if not math.isfinite(scale):
            errors.append(f"--lora {path}: the scale must be a finite number, got {scale}")
        suffix = Path(path).suffix.lower()
        if suffix in (".pt", ".pth", ".ckpt", ".bin", ".pkl"):
            errors.append(f"--lora {path}: {suffix} files are pickles, which can run code when loaded; "
                          "use the .safetensors version of the LoRA")
        elif not Path(path).is_file():
            errors.append(f"--lora {path}: no such file")
        specs.append(LoraSpec(Path(path), scale, args.lora_ignore_alpha or index >= own_flags))
    return tuple(specs), errors
