"""The LLM text encoder: the LLaVA-Llama-3 language model with HunyuanVideo's templates and crops."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from hyvideo.constants import PromptTemplate
from hyvideo.text_encoder.common import (
    DataType,
    FrozenEncoder,
    TextEncoderOutput,
    check_model_folder,
    clean_prompts,
    count_template_prefix_tokens,
    load_frozen_model,
    resolve_dtype,
    resolve_prompt_template,
    short_text,
    tokenize_with_lengths,
)

logger = logging.getLogger(__name__)

PREPROCESS_SCRIPT = "scripts/preprocess_text_encoder_tokenizer_utils.py"


class TextEncoder(FrozenEncoder):
    """HunyuanVideo's LLM text encoder: templates, BOS + right padding, a skipped-layer hidden state, crop."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        text_len: int = 256,
        prompt_template: PromptTemplate | str = "dit-llm-encode",
        prompt_template_video: PromptTemplate | str = "dit-llm-encode-video",
        hidden_state_skip_layer: int | None = 2,
        apply_final_norm: bool = False,
    ) -> None:
        """Wrap an already loaded LlamaModel and its tokenizer (see `from_pretrained` to load a folder).

        Args:
            model: a transformers base model (LlamaModel) returning `hidden_states`.
            tokenizer: its tokenizer; must pad on the right and have a pad token.
            text_len: number of text tokens kept after the video template's prefix (256).
            prompt_template / prompt_template_video: image / video template (name or PromptTemplate).
            hidden_state_skip_layer: use `hidden_states[-(skip + 1)]`; None: the (final-normed) last state.
            apply_final_norm: apply the model's final norm to a skipped-layer state (off upstream).
        """
        super().__init__()
        if text_len < 1:
            raise ValueError(f"text_len must be a positive number of tokens, got {text_len}")
        num_layers = model.config.num_hidden_layers
        if hidden_state_skip_layer is not None and not 0 <= hidden_state_skip_layer < num_layers:
            raise ValueError(
                f"hidden_state_skip_layer must be in [0, {num_layers - 1}] for a {num_layers}-layer model, "
                f"got {hidden_state_skip_layer}"
            )
        if tokenizer.padding_side != "right" or tokenizer.pad_token_id is None:
            raise ValueError(
                "The LLM tokenizer must pad on the right with a pad token: load it with "
                "AutoTokenizer.from_pretrained(path, padding_side='right') from a folder that defines <pad>"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.prompt_template = resolve_prompt_template(prompt_template)
        self.prompt_template_video = resolve_prompt_template(prompt_template_video)
        self.hidden_state_skip_layer = hidden_state_skip_layer
        self.apply_final_norm = apply_final_norm
        # Parity: the token budget always comes from the *video* template (256 + 95 = 351), also when
        # the image template (crop 36) is used, so 1-frame outputs keep 351 - 36 = 315 tokens (spec
        # §10.5 item 8). We reproduce it because the DiT was run (and its outputs reported) that way.
        self.max_length = text_len + self.prompt_template_video.crop_start
        self._warn_if_crop_start_is_off()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | str = torch.float16,
        device: torch.device | str = "cpu",
        text_len: int = 256,
        prompt_template: PromptTemplate | str = "dit-llm-encode",
        prompt_template_video: PromptTemplate | str = "dit-llm-encode-video",
        hidden_state_skip_layer: int | None = 2,
        apply_final_norm: bool = False,
    ) -> TextEncoder:
        """Load the language model (as a base LlamaModel; an lm_head in the folder is ignored) and tokenizer.

        Args:
            path: the `text_encoder/` folder written by scripts/preprocess_text_encoder_tokenizer_utils.py.
            dtype: weight dtype (torch.float16 upstream), or "fp32" / "fp16" / "bf16".
            device: where the weights go.
            Other arguments: as in the constructor.
        """
        from transformers import AutoModel, AutoTokenizer

        folder, config = check_model_folder(path, "LLM text encoder")
        if config.get("model_type") == "llava":
            raise ValueError(
                f"{folder} is a whole LLaVA checkpoint; extract its language model first with "
                f"`python {PREPROCESS_SCRIPT} --input_dir {folder}`"
            )
        model = load_frozen_model(AutoModel, folder, resolve_dtype(dtype), device)
        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
        return cls(
            model,
            tokenizer,
            text_len=text_len,
            prompt_template=prompt_template,
            prompt_template_video=prompt_template_video,
            hidden_state_skip_layer=hidden_state_skip_layer,
            apply_final_norm=apply_final_norm,
        )

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def template_for(self, data_type: DataType) -> PromptTemplate:
        """The image template for 1-frame output ("image"), else the video template ("video")."""
        if data_type == "video":
            return self.prompt_template_video
        if data_type == "image":
            return self.prompt_template
        raise ValueError(f"data_type must be 'video' or 'image', got {data_type!r}")

    def output_length(self, data_type: DataType = "video") -> int:
        """L of `encode(...).hidden_state`: 256 for video, 315 for image with the defaults."""
        return self.max_length - self.template_for(data_type).crop_start

    def _warn_if_crop_start_is_off(self) -> None:
        # A tokenizer without BOS, or another template wording, would shift the crop silently.
        for template in (self.prompt_template, self.prompt_template_video):
            counted = count_template_prefix_tokens(self.tokenizer, template)
            if counted != template.crop_start:
                logger.warning(
                    "The template prefix has %d tokens with this tokenizer but crop_start is %d: the crop "
                    "will keep template tokens or drop prompt tokens. Is this the Llama-3 tokenizer (BOS)?",
                    counted,
                    template.crop_start,
                )

    def tokenize(self, prompts: str | Sequence[str], *, data_type: DataType = "video"):
        """Template + tokenizer call of the original (BOS, right padding to max_length, truncation).

        Returns a BatchEncoding with input_ids and attention_mask (B, max_length) on the CPU. A prompt
        that does not fit is logged as a warning with the number of tokens dropped.
        """
        template = self.template_for(data_type)
        cleaned = clean_prompts(prompts)
        texts = [template.template.format(prompt) for prompt in cleaned]
        tokens, full_lengths = tokenize_with_lengths(self.tokenizer, texts, self.max_length)
        for i, (prompt, n) in enumerate(zip(cleaned, full_lengths, strict=True)):
            if n > self.max_length:
                logger.warning(
                    f"Prompt {i} ({short_text(prompt)!r}) is too long for the LLM text encoder: with the "
                    f"{data_type} template it has {n} tokens but only {self.max_length} are kept "
                    f"({self.max_length - template.crop_start} after the template prefix), so the last "
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
        """Encode B prompts into the LLM states the DiT reads.

        Args:
            prompts: a prompt or a list of B prompts; each is stripped and must not be empty.
            data_type: "video" (video template, crop 95) or "image" (image template, crop 36; used upstream
                for 1-frame output).
            device: where to run; defaults to the device of the model weights.
                Runs under torch.inference_mode, so the outputs are inference tensors.

        Returns:
            TextEncoderOutput: hidden_state (B, L, D) in the model dtype, attention_mask and input_ids
            (B, L) int64, with L = `output_length(data_type)`; pooled_output None.
        """
        device = torch.device(device) if device is not None else self.device
        template = self.template_for(data_type)
        # 1. Template, tokens: (B, max_length)
        tokens = self.tokenize(prompts, data_type=data_type)
        input_ids = tokens["input_ids"].to(device)
        attention_mask = tokens["attention_mask"].to(device)
        # 2. Run the language model
        skip = self.hidden_state_skip_layer
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=skip is not None,
            use_cache=False,
        )
        # 3. Pick the state `skip` layers before the last: (B, max_length, D)
        if skip is None:
            hidden = outputs.last_hidden_state
        else:
            # hidden_states = (embeddings, layer 1, ..., layer N - 1, final-normed layer N)
            hidden = outputs.hidden_states[-(skip + 1)]
            if skip > 0 and self.apply_final_norm:
                hidden = self.model.norm(hidden)
        # 4. Drop the template prefix: (B, L, D), (B, L)
        crop = template.crop_start
        return TextEncoderOutput(
            hidden_state=hidden[:, crop:],
            attention_mask=attention_mask[:, crop:],
            input_ids=input_ids[:, crop:],
        )
