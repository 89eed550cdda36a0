"""Token layout of the I2V LLaVA prompt: image-token expansion and the crops of the encoder output.

The original ran transformers 4.39, whose Llava merged the 576 image features in place of the single
`<image>` token internally. Current transformers expect the ids pre-expanded (576 `<image>` ids). These pure
functions do that expansion and cut the expanded hidden states exactly where the original cut the merged
ones (i2v_spec §2): index j of the unexpanded ids is j + 575 after the image token, j before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyvideo.constants import PROMPT_TEMPLATE_ENCODE_VIDEO

# Parity: the original's "dit-llm-encode-video-i2v" template: the image goes first in the system turn, the
# instruction gains " according to the reference image", and the assistant header closes the prompt.
PROMPT_TEMPLATE_ENCODE_VIDEO_I2V = (
    PROMPT_TEMPLATE_ENCODE_VIDEO.replace("\n\nDescribe", "\n\n<image>\nDescribe", 1)
    .replace("following aspects: ", "following aspects according to the reference image: ", 1)
    .replace("<|eot_id|><|start_header_id|>user", "<|eot_id|>\n\n<|start_header_id|>user", 1)
    + "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# The I2V repository's NEGATIVE_PROMPT_I2V (hyvideo/constants.py there; checked against two copies of that
# file, tests/test_i2v_inputs.py). Used only with --cfg-scale > 1.
NEGATIVE_PROMPT_I2V = "deformation, a poor composition and deformed video, bad teeth, bad eyes, bad limbs"
ASSISTANT_HEADER_TOKENS = 4  # <|eot_id|> <|start_header_id|> assistant <|end_header_id|>
IMAGE_TOKEN_INTERLEAVE = {"token_replace": 4, "latent_concat": 2}


@dataclass(frozen=True)
class I2VPromptLayout:
    """Where things sit in the tokenized I2V prompt (unexpanded coordinates, BOS counted)."""

    template: str = PROMPT_TEMPLATE_ENCODE_VIDEO_I2V
    crop_start: int = 103  # tokens before the user prompt
    image_token_index: int = 5  # position of the single <image> token
    image_tokens: int = 576  # projected vision features per image (24 x 24 patches of CLIP-336)
    text_len: int = 256  # text budget after crop_start
    double_return_token_id: int = 271  # "\n\n"

    @property
    def max_length(self) -> int:
        return self.text_len + self.crop_start  # 359

    @property
    def expanded_length(self) -> int:
        return self.max_length + self.image_tokens - 1  # 934

    @property
    def text_tokens(self) -> int:
        """Text tokens kept per prompt: the prompt slot minus the 4-token assistant header (252)."""
        return self.max_length - self.crop_start - ASSISTANT_HEADER_TOKENS


def expand_image_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: I2VPromptLayout, image_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, max_length) ids/mask -> (B, expanded_length) ids, mask and position_ids, as 4.39 merged them.

    The single <image> id at `layout.image_token_index` becomes `image_tokens` copies with mask 1.
    Parity: position_ids = cumsum(mask) - 1 with padding positions set to 1 (the 4.39 merge).
    """
    at = layout.image_token_index
    found = (input_ids == image_token_id).nonzero()
    if found.shape[0] != input_ids.shape[0] or not bool((found[:, 1] == at).all()):
        raise ValueError(
            f"each I2V prompt needs exactly one <image> token, at position {at} (the template's): remove "
            "the text <image> from the prompt"
        )
    repeat = torch.ones(input_ids.shape[1], dtype=torch.long)
    repeat[at] = layout.image_tokens
    ids = input_ids.repeat_interleave(repeat.to(input_ids.device), dim=1)
    mask = attention_mask.repeat_interleave(repeat.to(attention_mask.device), dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, positions


def assistant_crop_end(input_ids: torch.Tensor, layout: I2VPromptLayout) -> int:
    """L of one (max_length,) id row: the index of the "\\n\\n" that ends the assistant header.

    Parity: the original takes the last "\\n\\n"; when only the template's first three remain (the prompt
    was truncated, so the assistant header is gone) it uses max_length.
    """
    hits = (input_ids == layout.double_return_token_id).nonzero().flatten().tolist()
    if len(hits) == 3:
        return layout.max_length
    if len(hits) < 3:
        raise ValueError("the I2V prompt lost its template tokens; is this the Llama-3 tokenizer?")
    return hits[-1]


def text_positions(end: int, layout: I2VPromptLayout) -> list[int]:
    """Unexpanded positions of the kept text: [crop_start, L - 4) ++ [L, max_length) (always 252)."""
    return list(range(layout.crop_start, end - ASSISTANT_HEADER_TOKENS)) + list(range(end, layout.max_length))


def expanded_position(j: int, layout: I2VPromptLayout) -> int:
    """Position of unexpanded token j (not the image token) in the expanded sequence."""
    return j + layout.image_tokens - 1 if j > layout.image_token_index else j


def split_image_and_text(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layout: I2VPromptLayout,
    interleave: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the LLaVA states into the DiT's text conditioning: [every k-th image token | 252 text tokens].

    Args:
        hidden: (B, expanded_length, D) hidden states of the expanded prompt.
        input_ids, attention_mask: (B, max_length) the *unexpanded* ids and mask.
        interleave: keep image tokens 0, k, 2k, ... (4 for token_replace -> 144, 2 for latent_concat -> 288).
    Returns:
        states (B, 576 / k + 252, D) and mask (B, 576 / k + 252) int64.
    """
    start = layout.image_token_index
    image = hidden[:, start : start + layout.image_tokens : interleave]  # (B, 576 / k, D)
    states, masks = [], []
    for row in range(hidden.shape[0]):
        keep = text_positions(assistant_crop_end(input_ids[row], layout), layout)
        index = torch.tensor([expanded_position(j, layout) for j in keep], device=hidden.device)
        states.append(torch.cat((image[row], hidden[row, index]), dim=0))
        image_mask = torch.ones(image.shape[1], dtype=attention_mask.dtype, device=attention_mask.device)
        masks.append(torch.cat((image_mask, attention_mask[row, keep])))
    return torch.stack(states), torch.stack(masks)
