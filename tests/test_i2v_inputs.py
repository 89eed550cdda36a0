"""I2V inputs: resolution buckets, the reference image, and the LLaVA prompt layout on real Llama-3 ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from hyvideo.i2v import (
    bucket_for_image,
    crop_size_list,
    image_to_tensor,
    load_reference_image,
    resize_and_center_crop,
)
from hyvideo.i2v.llava_layout import (
    NEGATIVE_PROMPT_I2V,
    PROMPT_TEMPLATE_ENCODE_VIDEO_I2V,
    I2VPromptLayout,
    assistant_crop_end,
    expand_image_tokens,
    split_image_and_text,
)
from hyvideo.testing.tokenizers import write_llama3_tokenizer

IMAGE_ID, PAD_ID, EOT = 128257, 128258, 128009


# ----- buckets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "resolution, width, height, expected",
    [  # i2v_spec §3 worked examples; expected (H, W)
        ("720p", 1280, 720, (704, 1248)),
        ("720p", 720, 1280, (1248, 704)),
        ("720p", 800, 800, (960, 960)),
        ("720p", 1024, 768, (832, 1088)),
        ("540p", 1920, 1080, (544, 928)),
        ("360p", 1920, 1080, (352, 608)),
    ],
)
def test_bucket_worked_examples(resolution, width, height, expected):
    assert bucket_for_image(height, width, resolution) == expected


def test_crop_size_list_shape_rules():
    buckets = crop_size_list(960)
    assert (960, 960) in buckets
    for h, w in buckets:
        assert h % 32 == 0 and w % 32 == 0 and max(h, w) / min(h, w) <= 4
        assert (h // 32) * (w // 32) <= 30 * 30
    # first bucket is the tallest allowed one (wp walks down from N), last the widest
    assert buckets[0][0] > buckets[0][1] and buckets[-1][0] < buckets[-1][1]


def test_bucket_rule_is_asymmetric():
    # A square image only sees ratios <= 1 (includes square); a slightly landscape one only ratios > H/W.
    assert bucket_for_image(1000, 1000, "720p") == (960, 960)
    h, w = bucket_for_image(999, 1000, "720p")
    assert h / w > 0.999


def test_unknown_resolution():
    with pytest.raises(ValueError, match="--i2v-resolution"):
        bucket_for_image(720, 1280, "1080p")


# ----- image loading and cropping ----------------------------------------------------------------------


def _save(tmp_path, mode, size, name="img.png", color=None):
    path = tmp_path / name
    Image.new(mode, size, color).save(path)
    return path


@pytest.mark.parametrize(
    "mode, color", [("RGB", (10, 20, 30)), ("RGBA", (10, 20, 30, 0)), ("L", 77), ("P", 3)]
)
def test_load_converts_to_rgb(tmp_path, mode, color):
    image = load_reference_image(_save(tmp_path, mode, (40, 30), color=color))
    assert image.mode == "RGB" and image.size == (40, 30)
    if mode == "RGBA":  # alpha dropped, not composited (the original's convert("RGB"))
        assert image.getpixel((0, 0)) == (10, 20, 30)


def test_load_errors_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--i2v-image-path"):
        load_reference_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="--i2v-image-path .*not a readable image"):
        load_reference_image(junk)
    with pytest.raises(ValueError, match="too small"):
        load_reference_image(_save(tmp_path, "RGB", (8, 100)))


def _gradient(width, height):
    x = np.arange(width * height * 3, dtype=np.int64).reshape(height, width, 3) % 251
    return Image.fromarray(x.astype(np.uint8), "RGB")


def test_crop_without_resize_is_centered_with_half_even_offsets():
    # Shorter side already the bucket's: no resize; (1251 - 1248) / 2 = 1.5 rounds to 2 (Python round).
    image = _gradient(1251, 704)
    out = resize_and_center_crop(image, (704, 1248))
    assert out.size == (1248, 704)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image)[:, 2:1250])


def test_resize_then_crop_sizes():
    out = resize_and_center_crop(_gradient(1280, 720), (704, 1248))  # resized to 1251 x 704 first
    assert out.size == (1248, 704)
    expected = np.asarray(_gradient(1280, 720).resize((1251, 704), Image.BILINEAR))[:, 2:1250]
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_image_to_tensor_range_and_layout():
    image = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8).repeat(3, 0), "RGB")  # H 3, W 1
    x = image_to_tensor(image)
    assert x.shape == (1, 3, 1, 3, 1)
    torch.testing.assert_close(x[0, :, 0, 0, 0], torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))


# ----- LLaVA prompt layout on the real tokenizer ------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = write_llama3_tokenizer(tmp_path_factory.mktemp("llama3"))
    return AutoTokenizer.from_pretrained(folder, padding_side="right")


def _tokenize(tokenizer, prompts, layout):
    texts = [layout.template.format(p) for p in prompts]
    return tokenizer(
        texts, max_length=layout.max_length, padding="max_length", truncation=True, return_tensors="pt"
    )


def test_template_prefix_positions(tokenizer):
    layout = I2VPromptLayout()
    t = layout.template
    prefix = tokenizer(t[: t.index("{}")])["input_ids"]
    assert len(prefix) == layout.crop_start == 103
    assert prefix[layout.image_token_index] == IMAGE_ID
    assert [i for i, x in enumerate(prefix) if x == 271] == [4, 98, 102]


def test_text_crop_keeps_prompt_final_newlines_and_padding(tokenizer):
    layout = I2VPromptLayout()
    prompt = "A cat walks on the grass, realistic style."
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens = _tokenize(tokenizer, [prompt], layout)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    end = assistant_crop_end(ids[0], layout)
    assert ids[0, end - 4].item() == EOT and end == 103 + len(prompt_ids) + 4
    # hidden "states" = expanded position index, so the crop says which positions it took
    ex_ids, ex_mask, positions = expand_image_tokens(ids, mask, layout, IMAGE_ID)
    assert ex_ids.shape == (1, 934) and (ex_ids[0, 5:581] == IMAGE_ID).all()
    assert torch.equal(ex_ids[0, 581:], ids[0, 6:]) and torch.equal(ex_mask[0, 581:], mask[0, 6:])
    assert positions[0, : int(ex_mask.sum())].tolist() == list(range(int(ex_mask.sum())))
    hidden = torch.arange(934, dtype=torch.float32)[None, :, None]
    states, out_mask = split_image_and_text(hidden, ids, mask, layout, interleave=4)
    assert states.shape == (1, 144 + 252, 1) and out_mask.shape == (1, 396)
    taken = states[0, :, 0].long()
    assert taken[:144].tolist() == list(range(5, 581, 4))
    kept_ids = ex_ids[0, taken[144:]].tolist()
    n = len(prompt_ids)
    assert kept_ids[:n] == prompt_ids and kept_ids[n] == 271 and set(kept_ids[n + 1 :]) == {PAD_ID}
    assert out_mask[0].tolist() == [1] * (144 + n + 1) + [0] * (252 - n - 1)
    assert taken[144].item() == 103 + 575  # first prompt token, shifted by the 575 extra image tokens


def test_truncated_prompt_keeps_252_prompt_tokens(tokenizer):
    layout = I2VPromptLayout()
    prompt = " ".join(["word"] * 400)
    tokens = _tokenize(tokenizer, [prompt, "short"], layout)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert assistant_crop_end(ids[0], layout) == 359
    hidden = torch.arange(934, dtype=torch.float32)[None, :, None].repeat(2, 1, 1)
    states, out_mask = split_image_and_text(hidden, ids, mask, layout, interleave=2)
    assert states.shape == (2, 288 + 252, 1)
    assert states[0, 288:, 0].long().tolist() == [j + 575 for j in range(103, 355)]
    assert out_mask[0].all() and out_mask[1, : 288 + 2].all() and not out_mask[1, 288 + 2 :].any()


def test_template_and_negative_prompt_are_the_i2v_repositorys_text():
    """As written in HunyuanVideo-I2V's hyvideo/constants.py, read in two copies (a fork of the repository
    and mindone's port) on 2026-11-26; ours derives the template from the T2V one: a T2V edit shows here."""
    expected_template = (
        "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the "
        "following aspects according to the reference image: 1. The main content and theme of the video."
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
        "4. background environment, light, style and atmosphere."
        "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
        "\n\n<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\n"
    )
    assert PROMPT_TEMPLATE_ENCODE_VIDEO_I2V == expected_template
    assert NEGATIVE_PROMPT_I2V == (
        "deformation, a poor composition and deformed video, bad teeth, bad eyes, bad limbs"
    )
