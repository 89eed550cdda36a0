"""The I2V text encoder: the whole LLaVA-Llama-3 (CLIP vision tower + projector + language model).

Runs with the current transformers API (the 576 image tokens pre-expanded in the ids) and returns the
states the original got from transformers 4.39 (which merged the image features internally):
[every k-th image token | 252 text tokens], see hyvideo/i2v/llava_layout.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from hyvideo.i2v.llava_layout import I2VPromptLayout, expand_image_tokens, split_image_and_text
from hyvideo.text_encoder.common import (
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


def _image_processor_class():
    # Parity: the PIL (slow) CLIP processor of transformers 4.39: bicubic shortest edge, center crop.
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers < 5
        from transformers import CLIPImageProcessor as processor_class
    return processor_class


class LlavaTextEncoder(FrozenEncoder):
    """HunyuanVideo-I2V's MLLM encoder: prompt + reference image -> [image tokens | text tokens] states."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        image_processor,
        *,
        interleave: int = 4,
        hidden_state_skip_layer: int = 2,
        layout: I2VPromptLayout | None = None,
    ) -> None:
        """Wrap a loaded LlavaForConditionalGeneration, its right-padding tokenizer and CLIP image processor.

        Args:
            interleave: keep image tokens 0, k, 2k, ... (4 for token_replace, 2 for latent_concat).
            hidden_state_skip_layer: use hidden_states[-(skip + 1)] (2 upstream; no final norm).
        """
        super().__init__()
        if tokenizer.padding_side != "right" or tokenizer.pad_token_id is None:
            raise ValueError("The LLaVA tokenizer must pad on the right with a pad token (<pad>)")
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.interleave, self.hidden_state_skip_layer = interleave, hidden_state_skip_layer
        vision = model.config.vision_config
        n_patches = (vision.image_size // vision.patch_size) ** 2
        self.layout = layout or I2VPromptLayout(image_tokens=n_patches)
        self.image_token_id = model.config.image_token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | str = torch.float16,
        device: torch.device | str = "cpu",
        interleave: int = 4,
        hidden_state_skip_layer: int = 2,
    ) -> LlavaTextEncoder:
        """Load `text_encoder_i2v/` (xtuner/llava-llama-3-8b-v1_1-transformers: model, tokenizer, processor).
        """
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        folder, config = check_model_folder(path, "I2V LLaVA text encoder")
        if config.get("model_type") != "llava":
            raise ValueError(
                f"{folder} is not a whole LLaVA checkpoint (model_type {config.get('model_type')!r}); "
                "--i2v-mode needs xtuner/llava-llama-3-8b-v1_1-transformers in text_encoder_i2v/"
            )
        model = load_frozen_model(LlavaForConditionalGeneration, folder, resolve_dtype(dtype), device)
        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
        processor = _image_processor_class().from_pretrained(folder)
        return cls(
            model,
            tokenizer,
            processor,
            interleave=interleave,
            hidden_state_skip_layer=hidden_state_skip_layer,
        )

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def tokenize(self, prompts: str | Sequence[str]):
        """The I2V template, BOS, right padding to 359 tokens, truncation (logged)."""
        layout = self.layout
        cleaned = clean_prompts(prompts)
        texts = [layout.template.format(p) for p in cleaned]
        tokens, lengths = tokenize_with_lengths(self.tokenizer, texts, layout.max_length)
        for i, (prompt, n) in enumerate(zip(cleaned, lengths, strict=True)):
            if n > layout.max_length:
                logger.warning(
                    "Prompt %d (%r) is too long for the I2V text encoder: %d of its tokens were dropped",
                    i,
                    short_text(prompt),
                    n - layout.max_length,
                )
        return tokens

    @torch.inference_mode()
    def encode(
        self, prompts: str | Sequence[str], images: Sequence, *, device: torch.device | str | None = None
    ) -> TextEncoderOutput:
        """Encode B prompts, each with its reference image (PIL RGB, the original file, not the crop).

        Returns:
            TextEncoderOutput: hidden_state (B, 576 / k + 252, D), attention_mask (B, 576 / k + 252) int64
            (ones for the image tokens, then the text mask), input_ids of the kept positions.
        """
        device = torch.device(device) if device is not None else self.device
        # 1. Tokens (B, 359) and pixels (B, 3, 336, 336)
        tokens = self.tokenize(prompts)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        if len(images) != ids.shape[0]:
            raise ValueError(f"got {len(images)} images for {ids.shape[0]} prompts: pass one per prompt")
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        # 2. Pre-expanded image tokens (B, 934), as transformers 4.39 merged them
        ex_ids, ex_mask, positions = expand_image_tokens(ids, mask, self.layout, self.image_token_id)
        # 3. LLaVA forward; the state `skip` layers before the last (no final norm): (B, 934, D)
        outputs = self.model(
            input_ids=ex_ids.to(device),
            attention_mask=ex_mask.to(device),
            position_ids=positions.to(device),
            pixel_values=pixels.to(device, self.dtype),
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = outputs.hidden_states[-(self.hidden_state_skip_layer + 1)]
        # 4. [every k-th image token | the prompt, the final "\n\n" and padding]
        states, out_mask = split_image_and_text(
            hidden, ids.to(device), mask.to(device), self.layout, self.interleave
        )
        # the ids behind those states, cut the same way (ids < 2^53 are exact in float64)
        kept_ids = split_image_and_text(
            ex_ids[..., None].double().to(device),
            ids.to(device),
            mask.to(device),
            self.layout,
            self.interleave,
        )[0][..., 0].long()
        return TextEncoderOutput(hidden_state=states, attention_mask=out_mask, input_ids=kept_ids)
