"""Shared parts of the text encoders: the output type, prompt cleanup, tokenization and loading."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from hyvideo.constants import PRECISION_TO_TYPE, PROMPT_TEMPLATE, PromptTemplate

logger = logging.getLogger(__name__)

DataType = Literal["video", "image"]
CKPTS_HINT = "See ckpts/README.md for how to download and prepare the text encoders."


@dataclass(frozen=True)
class TextEncoderOutput:
    """What an encoder returns for B prompts (all tensors on the device the encoder ran on).

    hidden_state: (B, L, D) in the model dtype. LLM: the chosen layer's states with the template prefix
        cropped. CLIP: the last hidden state (B, 77, 768).
    attention_mask: (B, L) int64, 1 for real tokens, right padded; cropped like `hidden_state`.
    input_ids: (B, L) int64, the token ids behind `hidden_state` (cropped likewise).
    pooled_output: (B, D) CLIP pooled output (final-normed state at the first end token); None for the LLM.
    """

    hidden_state: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    pooled_output: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Prompts and tokenization
# --------------------------------------------------------------------------------------------------


def resolve_prompt_template(template: PromptTemplate | str) -> PromptTemplate:
    """A PromptTemplate object, or the name of one in `hyvideo.constants.PROMPT_TEMPLATE`."""
    if isinstance(template, PromptTemplate):
        resolved = template
    elif isinstance(template, str) and template in PROMPT_TEMPLATE:
        resolved = PROMPT_TEMPLATE[template]
    else:
        raise ValueError(
            f"Unknown prompt template {template!r}: use one of {sorted(PROMPT_TEMPLATE)} or a PromptTemplate"
        )
    if resolved.template.count("{}") != 1 or resolved.crop_start < 0:
        raise ValueError(
            f"A prompt template needs exactly one '{{}}' for the prompt and crop_start >= 0, got {resolved!r}"
        )
    return resolved


def clean_prompts(prompts: str | Sequence[str]) -> list[str]:
    """One prompt or a list of prompts -> list of stripped, non-empty prompts (ValueError otherwise)."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError("No prompt given: pass a string or a non-empty list of strings")
    cleaned = []
    for i, prompt in enumerate(items):
        if not isinstance(prompt, str):
            raise ValueError(f"Prompt {i} must be a string, got {type(prompt).__name__}")
        # Parity: the original strips prompts (and negative prompts) before encoding.
        prompt = prompt.strip()
        if not prompt:
            raise ValueError(f"Prompt {i} is empty or only whitespace: give a description of the video")
        cleaned.append(prompt)
    return cleaned


def count_template_prefix_tokens(tokenizer, template: PromptTemplate | str) -> int:
    """Number of tokens (with the tokenizer's BOS) before the prompt slot of a template."""
    text = resolve_prompt_template(template).template
    return len(tokenizer(text[: text.index("{}")])["input_ids"])


def tokenize_with_lengths(tokenizer, texts: list[str], max_length: int):
    """Tokenize as the original does; also return each text's untruncated length (special tokens included)."""
    full_lengths = [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
    tokens = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
        return_attention_mask=True,
    )
    return tokens, full_lengths


def short_text(text: str, n: int = 50) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in PRECISION_TO_TYPE:
        return PRECISION_TO_TYPE[dtype]
    raise ValueError(f"Unknown dtype {dtype!r}: use a torch.dtype or one of {sorted(PRECISION_TO_TYPE)}")


def check_model_folder(path: str | os.PathLike, what: str) -> tuple[Path, dict]:
    """The folder as a Path and its config.json; FileNotFoundError pointing at ckpts/README.md."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"The {what} folder {folder} does not exist. {CKPTS_HINT}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json, so it is not a saved {what}. {CKPTS_HINT}")
    return folder, json.loads(config_file.read_text(encoding="utf-8"))


class _QuietUnusedWeights(logging.Filter):
    """Drops transformers' load report when its only findings are unused checkpoint weights.

    The LLM folder holds a LlamaForCausalLM (lm_head unused) and the CLIP folder a whole CLIPModel (vision
    tower unused); a report that lists missing or mismatched weights still gets through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        return any(word in message for word in ("MISSING", "MISMATCH", "CONVERSION"))


def load_frozen_model(model_cls, folder: Path, dtype: torch.dtype, device: torch.device | str):
    """`model_cls.from_pretrained` in `dtype` on `device`, frozen, eval mode; missing weights are an error."""
    hf_logger = logging.getLogger("transformers.modeling_utils")
    quiet = _QuietUnusedWeights()
    hf_logger.addFilter(quiet)
    try:
        model, info = model_cls.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways (SafetensorError, OSError..)
        # e.g. a pickle where safetensors are expected, a truncated download, no weights at all
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not load the model in {folder} ({type(err).__name__}: {first[:300]}). "
                         f"{CKPTS_HINT}") from err
    finally:
        hf_logger.removeFilter(quiet)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"{folder} lacks {len(missing)} weights of {type(model).__name__} (e.g. {missing[:3]}); the "
            f"folder is incomplete or holds another model. {CKPTS_HINT}"
        )
    unused = info.get("unexpected_keys") or []
    if unused:
        logger.debug("%d weights in %s are not used by %s", len(unused), folder, type(model).__name__)
    # Parity: the original loads and then calls `.to(dtype)`, which also casts floating buffers; for Llama
    # that rounds the RoPE inverse frequencies to fp16 (transformers 5 keeps them in fp32 otherwise).
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


class FrozenEncoder(nn.Module):
    """A text encoder wrapping one frozen transformers model as `self.model`: its dtype and device."""

    model: nn.Module

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.model)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)
