"""Quantise a bf16 HunyuanVideo DiT checkpoint to the official fp8 format (weights + per-layer scale map).

    python scripts/convert_to_fp8.py \\
        --input ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt \\
        --output-dir ckpts/hunyuan-video-t2v-720p/transformers

writes, in `--output-dir`, the pair that `sample_video.py --use-fp8` reads:
* `mp_rank_00_model_states_fp8.pt`: {"module": state dict}, the 320 block linears (every nn.Linear under
  double_blocks / single_blocks) as float8_e4m3fn W / scale, every other tensor as stored (bf16);
* `mp_rank_00_model_states_fp8_map.pt`: {module name: 0-d float32 scale}, scale = max|W| / 448.

The original repository never published its quantisation tool (HunyuanVideo issue #153); this one follows the
format its loader reads (see hyvideo/modules/fp8_optimization.py for the rounding). The input is
memory-mapped and quantised one layer at a time, so the extra memory is about the size of the output; the
input's pages are file cache the kernel can drop. Fine-tuned checkpoints convert the same way.

Exit status: 0 on success, 2 (with a one-line message) for a bad input or output.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hyvideo.modules.fp8_optimization import fp8_weight_names, quantize_state_dict  # noqa: E402
from hyvideo.modules.loading import load_dit_state_dict  # noqa: E402

logger = logging.getLogger("convert_to_fp8")

WEIGHTS_NAME = "mp_rank_00_model_states_fp8.pt"
MAP_NAME = "mp_rank_00_model_states_fp8_map.pt"
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


class InputError(Exception):
    """A problem with the command-line input, reported in one line with exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="bf16 DiT checkpoint, e.g. mp_rank_00_model_states.pt")
    parser.add_argument("--load-key", default="module", choices=("module", "ema"),
                        help="entry of a wrapped checkpoint to convert (default: module)")
    parser.add_argument("--output-dir", required=True, help="folder for the _fp8.pt / _fp8_map.pt pair")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser.parse_args(argv)


def read_input(path: Path, load_key: str) -> dict[str, torch.Tensor]:
    """The flat, memory-mapped DiT state dict; InputError when it is missing, not a DiT, or already fp8."""
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    try:
        state_dict = load_dit_state_dict(path, load_key)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise InputError(f"{path} is not a DiT checkpoint: {str(err).splitlines()[0]}") from err
    fp8 = [key for key, tensor in state_dict.items() if tensor.dtype in _FP8_DTYPES]
    if fp8:
        raise InputError(f"{path} is already fp8 ({len(fp8)} fp8 tensors, e.g. {fp8[0]}); nothing to convert")
    if "img_in.proj.weight" not in state_dict or not fp8_weight_names(state_dict):
        raise InputError(
            f"{path} is not a HunyuanVideo DiT state dict (no img_in.proj.weight or no double_blocks / "
            "single_blocks linear weights)"
        )
    return state_dict


def save_atomically(obj: object, path: Path) -> None:
    """torch.save to a temporary name, then rename: an interrupted run leaves no half-written output."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def convert(input_path: Path, output_dir: Path, load_key: str, overwrite: bool) -> tuple[Path, Path]:
    """Quantise `input_path` and write the official fp8 pair into `output_dir`; returns (weights, map)."""
    weights_out, map_out = output_dir / WEIGHTS_NAME, output_dir / MAP_NAME
    existing = [p.name for p in (weights_out, map_out) if p.exists()]
    if existing and not overwrite:
        raise InputError(f"{output_dir} already has {', '.join(existing)}; pass --overwrite to replace")
    if weights_out.exists() and weights_out.resolve() == input_path.resolve():
        raise InputError(f"--input and the output are the same file ({weights_out})")
    state_dict = read_input(input_path, load_key)
    output_dir.mkdir(parents=True, exist_ok=True)
    fp8_state_dict, scale_map = quantize_state_dict(state_dict, page_out=True)  # the loader's rule, too
    logger.info("quantised %d layers of %d tensors", len(scale_map), len(fp8_state_dict))
    # Parity: the official fp8 file is wrapped under "module", like the bf16 release.
    save_atomically({"module": fp8_state_dict}, weights_out)
    save_atomically(scale_map, map_out)
    return weights_out, map_out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        weights_out, map_out = convert(Path(args.input), Path(args.output_dir), args.load_key, args.overwrite)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("wrote %s and %s", weights_out, map_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
