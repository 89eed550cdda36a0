"""--i2v-* flags: defaults, checkpoint folders, the legacy DiT config, LoRA flag mapping, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from hyvideo import config


@pytest.fixture(autouse=True)
def _no_model_base_env(monkeypatch):
    monkeypatch.delenv("MODEL_BASE", raising=False)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "cat.png"
    Image.new("RGB", (64, 48)).save(path)
    return str(path)


def test_off_by_default_and_t2v_unchanged():
    cfgs = config.parse_args(["--prompt", "a cat"])
    assert not cfgs.i2v.enabled and cfgs.sampling.flow_shift == 7.0
    assert cfgs.model.dit.image_condition_type is None
    assert cfgs.model.dit_weight_path == Path(
        "ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt"
    )
    assert cfgs.model.text_encoder_path == Path("ckpts/text_encoder")


def test_i2v_defaults_and_folders(image):
    cfgs = config.parse_args(["--prompt", "a cat", "--i2v-mode", "--i2v-image-path", image])
    assert cfgs.i2v.enabled and cfgs.i2v.condition_type == "token_replace" and cfgs.i2v.interleave == 4
    assert cfgs.sampling.flow_shift == 17.0 and cfgs.sampling.embedded_cfg_scale == 6.0
    assert cfgs.model.dit.image_condition_type == "token_replace" and cfgs.model.dit.guidance_embed
    assert cfgs.model.dit_weight_path == Path(
        "ckpts/hunyuan-video-i2v-720p/transformers/mp_rank_00_model_states.pt"
    )
    assert cfgs.model.vae_path == Path("ckpts/hunyuan-video-i2v-720p/vae")
    assert cfgs.model.text_encoder_path == Path("ckpts/text_encoder_i2v")
    given = config.parse_args(
        [
            "--prompt",
            "a",
            "--i2v-mode",
            "--i2v-image-path",
            image,
            "--flow-shift",
            "7",
            "--i2v-dit-weight",
            "x.pt",
        ]
    )
    assert given.sampling.flow_shift == 7.0 and given.model.dit_weight_path == Path("x.pt")


def test_latent_concat_is_the_legacy_33_channel_dit(image):
    cfgs = config.parse_args(
        ["--prompt", "a", "--i2v-mode", "--i2v-image-path", image, "--i2v-condition-type", "latent_concat"]
    )
    dit = cfgs.model.dit
    assert dit.in_channels == 33 and dit.out_channels == 16 and not dit.guidance_embed
    assert cfgs.i2v.interleave == 2


def test_i2v_lora_flags_map_onto_lora(tmp_path, image):
    lora = tmp_path / "hair.safetensors"
    lora.write_bytes(b"x")
    cfgs = config.parse_args(
        [
            "--prompt",
            "a",
            "--i2v-mode",
            "--i2v-image-path",
            image,
            "--use-lora",
            "--lora-path",
            str(lora),
            "--lora-scale",
            "0.5",
        ]
    )
    (spec,) = cfgs.model.loras
    assert spec.path == lora and spec.scale == 0.5 and spec.ignore_alpha


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--i2v-mode"], "--i2v-mode needs --i2v-image-path"),
        (["--i2v-mode", "--i2v-image-path", "nope.png"], "--i2v-image-path nope.png: no such file"),
        (["--i2v-image-path", "x.png"], "--i2v-image-path needs --i2v-mode"),
        (["--use-lora"], "--use-lora and --lora-path go together"),
        (["--i2v-resolution", "1080p"], "--i2v-resolution"),
        (["--i2v-mode", "--i2v-image-path", __file__, "--prompt", "an <image> of a cat"], "must not contain"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        config.parse_args(["--prompt", "a", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
