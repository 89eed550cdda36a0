"""The I2V LLaVA encoder (tiny random LLaVA, real Llama-3 tokenizer): pre-expanded ids == the old merge."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from hyvideo.i2v.llava import LlavaTextEncoder
from hyvideo.testing.tiny import write_llava
from tests.helpers import rel_err

PROMPTS = ["A cat walks on the grass, realistic style.", "A dog runs."]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    folder = write_llava(tmp_path_factory.mktemp("llava"))
    return LlavaTextEncoder.from_pretrained(folder, dtype=torch.float32, interleave=4)


def images():
    return [Image.new("RGB", (120, 90), (200, 30, 60)), Image.new("RGB", (64, 128), (10, 220, 90))]


def old_api_states(encoder: LlavaTextEncoder, prompts, pictures) -> torch.Tensor:
    """transformers 4.39 behaviour written out: one <image> id in the text, its embedding replaced by the 576
    projected features, position_ids = cumsum(mask) - 1; hidden_states[-3] of the language model."""
    model, layout = encoder.model, encoder.layout
    tokens = encoder.tokenize(prompts)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    pixels = encoder.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output  # per image (576, D)
        features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
        embeds = model.get_input_embeddings()(ids.masked_fill(ids == encoder.image_token_id, 0))
        at = layout.image_token_index
        merged = torch.cat((embeds[:, :at], features, embeds[:, at + 1 :]), dim=1)
        merged_mask = torch.cat(
            (mask[:, :at], torch.ones(len(prompts), features.shape[1], dtype=mask.dtype), mask[:, at + 1 :]),
            dim=1,
        )
        positions = (merged_mask.cumsum(-1) - 1).masked_fill(merged_mask == 0, 1)
        out = model.model.language_model(
            inputs_embeds=merged,
            attention_mask=merged_mask,
            position_ids=positions,
            output_hidden_states=True,
        )
    return out.hidden_states[-3], ids, mask


def test_pre_expanded_path_equals_hand_merge_of_image_features(encoder):
    out = encoder.encode(PROMPTS, images())
    hidden, ids, mask = old_api_states(encoder, PROMPTS, images())
    assert hidden.shape[1] == 934
    # the expected crop, written with the spec's expanded indices
    expected = []
    for row in range(2):
        end = max(i for i, x in enumerate(ids[row].tolist()) if x == 271)
        text = torch.cat((hidden[row, 678 : end + 571], hidden[row, end + 575 : 934]))
        expected.append(torch.cat((hidden[row, 5:581:4], text)))
    expected = torch.stack(expected)
    assert out.hidden_state.shape == (2, 144 + 252, 32)
    # Same maths in the same order; only the attention kernel's masking path may differ (float32).
    assert rel_err(out.hidden_state, expected) <= 1e-5
    n = [len(encoder.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    for row in range(2):
        valid = 144 + n[row] + 1  # image tokens, the prompt, the final "\n\n"
        assert out.attention_mask[row].tolist() == [1] * valid + [0] * (396 - valid)
    assert (out.input_ids[:, :144] == encoder.image_token_id).all()
    assert out.input_ids[0, 144 + n[0]].item() == 271


def test_image_changes_the_text_states(encoder):
    a = encoder.encode(PROMPTS[:1], images()[:1]).hidden_state
    b = encoder.encode(PROMPTS[:1], [Image.new("RGB", (120, 90), (0, 0, 255))]).hidden_state
    assert rel_err(a[:, 144:], b[:, 144:]) > 1e-4  # text tokens attend to the image tokens


def test_one_image_per_prompt(encoder):
    with pytest.raises(ValueError, match="one per prompt"):
        encoder.encode(PROMPTS, images()[:1])
