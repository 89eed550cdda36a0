"""The CLIP-L text encoder (text tower of openai/clip-vit-large-patch14): raw prompt, 77 tokens, pooled."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from hyvideo.text_encoder.common import (
    DataType,
    FrozenEncoder,
    TextEncoderOutput,
    check_model_folder,
    clean_prompts,
    load_frozen_model,
    resolve_dtype,
    short_text,
    tokenize_with_lengths,
)

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77


class CLIPTextEncoder(FrozenEncoder):
    """HunyuanVideo's second text encoder: CLIP-L's text tower on the raw prompt, 77 tokens, pooled output."""

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int = CLIP_MAX_LENGTH) -> None:
        """Wrap a loaded CLIPTextModel and its CLIPTokenizer (see `from_pretrained` to load a folder)."""
        super().__init__()
        positions = model.config.max_position_embeddings
        if not 2 <= max_length <= positions:
            raise ValueError(f"max_length must be in [2, {positions}] for this CLIP model, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | str = torch.float16,
        device: torch.device | str = "cpu",
        max_length: int = CLIP_MAX_LENGTH,
    ) -> CLIPTextEncoder:
        """Load CLIPTextModel + CLIPTokenizer from `text_encoder_2/` (openai/clip-vit-large-patch14).

        Args:
            path: the folder; a whole CLIPModel checkpoint is fine (its vision tower is ignored).
            dtype: weight dtype (torch.float16 upstream), or "fp32" / "fp16" / "bf16".
            device: where the weights go.
            max_length: tokens per prompt, start and end tokens included (77).
        """
        from transformers import CLIPTextModel, CLIPTokenizer

        folder, _ = check_model_folder(path, "CLIP text encoder")
        model = load_frozen_model(CLIPTextModel, folder, resolve_dtype(dtype), device)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        return cls(model, tokenizer, max_length=max_length)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, prompts: str | Sequence[str]):
        """Tokenize raw prompts to (B, max_length) with start/end tokens; over-long prompts are logged."""
        cleaned = clean_prompts(prompts)
        tokens, full_lengths = tokenize_with_lengths(self.tokenizer, cleaned, self.max_length)
        for i, (prompt, n) in enumerate(zip(cleaned, full_lengths, strict=True)):
            if n > self.max_length:
                logger.warning(
                    f"Prompt {i} ({short_text(prompt)!r}) is too long for CLIP: it has {n} tokens with the "
                    f"start and end tokens but only {self.max_length} are kept, so the last "
                    f"{n - self.max_length} token(s) were dropped."
                )
        return tokens

    @torch.inference_mode()
    def encode(
        self,
        prompts: str | Sequence[str],
        *,
        data_type: DataType = "video",
        device: torch.device | str | None = None,
    ) -> TextEncoderOutput:
        """Encode B raw prompts with CLIP-L.

        Args:
            prompts: a prompt or a list of B prompts; each is stripped and must not be empty.
            data_type: accepted for symmetry with TextEncoder.encode and ignored (CLIP uses no template).
            device: where to run; defaults to the device of the model weights.
                Runs under torch.inference_mode, so the outputs are inference tensors.

        Returns:
            TextEncoderOutput: pooled_output (B, D) (768 for CLIP-L), hidden_state (B, 77, D) the last
            hidden state, attention_mask and input_ids (B, 77) int64.
        """
        if data_type not in ("video", "image"):
            raise ValueError(f"data_type must be 'video' or 'image', got {data_type!r}")
        device = torch.device(device) if device is not None else self.device
        # 1. Tokens: (B, 77)
        tokens = self.tokenize(prompts)
        input_ids = tokens["input_ids"].to(device)
        attention_mask = tokens["attention_mask"].to(device)
        # 2. Text tower; the original passes the mask (diffusers does not; the pooled vector is the same)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return TextEncoderOutput(
            hidden_state=outputs.last_hidden_state,
            attention_mask=attention_mask,
            input_ids=input_ids,
            pooled_output=outputs.pooler_output,
        )
