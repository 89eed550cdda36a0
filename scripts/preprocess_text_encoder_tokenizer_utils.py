"""Extract the LLM text encoder of HunyuanVideo from a LLaVA-Llama-3 checkpoint.

    python scripts/preprocess_text_encoder_tokenizer_utils.py \\
        --input_dir ckpts/llava-llama-3-8b-v1_1-transformers --output_dir ckpts/text_encoder

Loads `LlavaForConditionalGeneration` in fp16 on the CPU (no GPU needed; about 17 GB of RAM for the 8B
model), keeps its Llama language model with the LM head, drops the vision tower and projector, and saves
that `LlamaForCausalLM` plus the tokenizer into `--output_dir`. The result is laid out like the folder the
original script writes; `hyvideo.text_encoder.TextEncoder.from_pretrained` loads it as a `LlamaModel`.

Exit status: 0 on success, 2 (with a one-line message) when the input is not such a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("preprocess_text_encoder")


class InputError(Exception):
    """A problem with the command-line input, reported in one line with exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--input_dir",
        "--input-dir",
        required=True,
        help="folder of a LLaVA-Llama-3 checkpoint, e.g. ckpts/llava-llama-3-8b-v1_1-transformers",
    )
    parser.add_argument(
        "--output_dir",
        "--output-dir",
        default=None,
        help="where to write the text encoder (default: a `text_encoder` folder beside --input_dir)",
    )
    return parser.parse_args(argv)


def check_input_dir(input_dir: Path) -> None:
    """Raise InputError unless `input_dir` holds a LLaVA checkpoint whose language model is a Llama."""
    if not input_dir.is_dir():
        raise InputError(f"--input_dir {input_dir} does not exist or is not a folder")
    config_file = input_dir / "config.json"
    if not config_file.is_file():
        raise InputError(f"{input_dir} has no config.json: it is not a transformers LLaVA checkpoint")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{config_file} is not readable JSON ({exc})") from exc
    model_type = config.get("model_type")
    if model_type != "llava":
        raise InputError(
            f"{input_dir} holds a {model_type!r} model, not a LLaVA checkpoint (model_type 'llava'), "
            "e.g. xtuner/llava-llama-3-8b-v1_1-transformers"
        )
    text_type = (config.get("text_config") or {}).get("model_type", "llama")
    if text_type != "llama":
        raise InputError(f"{input_dir} is a LLaVA with a {text_type!r} language model; a Llama one is needed")


def resolve_output_dir(input_dir: Path, output_dir: str | None) -> Path:
    out = Path(output_dir) if output_dir is not None else input_dir.parent / "text_encoder"
    if out.resolve() == input_dir.resolve():
        raise InputError(f"--output_dir {out} is the input folder: choose another folder")
    return out


def extract_causal_lm(llava):
    """The LLaVA's language model as a `LlamaForCausalLM` (shares the weights, copies nothing).

    transformers 4.x keeps a whole LlamaForCausalLM at `llava.language_model`; transformers 5 keeps the base
    LlamaModel at `llava.model.language_model` and the LM head at `llava.lm_head`, so the two are put back
    into an empty LlamaForCausalLM shell.
    """
    import torch
    from transformers import LlamaForCausalLM

    legacy = getattr(llava, "language_model", None)
    if isinstance(legacy, LlamaForCausalLM):
        return legacy
    base = llava.model.language_model
    with torch.device("meta"):
        causal_lm = LlamaForCausalLM(base.config)
    causal_lm.model = base
    causal_lm.lm_head = llava.lm_head
    leftovers = [name for name, p in causal_lm.named_parameters() if p.is_meta]
    if leftovers:
        raise RuntimeError(f"Unexpected LLaVA structure: {leftovers[:3]} were not taken from the checkpoint")
    causal_lm.config.architectures = ["LlamaForCausalLM"]
    return causal_lm


def convert(input_dir: Path, output_dir: Path) -> None:
    """Load the LLaVA checkpoint on the CPU in fp16 and save its language model and tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    try:
        # AutoProcessor would also need the image processor files, which are not used here.
        tokenizer = AutoTokenizer.from_pretrained(input_dir)
    except Exception as exc:  # transformers raises several types for missing or broken tokenizer files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot load the tokenizer of {input_dir} ({reason})") from exc
    logger.info("Loading %s (fp16, CPU)", input_dir)
    llava = LlavaForConditionalGeneration.from_pretrained(
        input_dir, dtype=torch.float16, low_cpu_mem_usage=True
    )
    causal_lm = extract_causal_lm(llava)
    logger.info("Saving the language model and the tokenizer to %s", output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    causal_lm.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        input_dir = Path(args.input_dir)
        check_input_dir(input_dir)
        output_dir = resolve_output_dir(input_dir, args.output_dir)
        convert(input_dir, output_dir)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("Done: %s", output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
