"""A DiT folder as diffusers' `save_pretrained` writes it loads from diffusers' own config.json."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hyvideo.config import parse_args
from hyvideo.inference import load_transformer, resolve_dit_config
from hyvideo.modules import HYVideoDiffusionTransformer
from hyvideo.modules.loading import dit_config_from_diffusers
from hyvideo.testing.peers import diffusers_dit_config, diffusers_transformer
from hyvideo.testing.tiny import randomize_
from tests.helpers import TINY_DIT_TEST, rel_err


@pytest.fixture(scope="module")
def twin_and_folder(tmp_path_factory):
    """diffusers' twin of a random tiny DiT, saved by diffusers as `<root>/transformer`."""
    model = HYVideoDiffusionTransformer(TINY_DIT_TEST)
    randomize_(model, generator=torch.Generator().manual_seed(7), std=0.2)
    twin = diffusers_transformer(TINY_DIT_TEST, model.state_dict())
    root = tmp_path_factory.mktemp("diffusers")
    twin.save_pretrained(root / "transformer")
    return twin, root


def inputs() -> dict:
    mask = torch.ones(2, 12)
    mask[1, 7:] = 0
    return {"x": torch.randn(2, 4, 3, 8, 8), "t": torch.tensor([500.0, 20.0]),
            "text_states": torch.randn(2, 12, 32), "text_mask": mask, "text_states_2": torch.randn(2, 16),
            "guidance": torch.tensor([6016.0, 3504.0])}


@pytest.mark.parametrize("where", ["transformer", "root"])
def test_save_pretrained_folder_loads_and_matches_diffusers(twin_and_folder, caplog, where):
    twin, root = twin_and_folder
    folder = root / "transformer" if where == "transformer" else root
    assert not list(root.rglob("dit_config.json"))  # no project-only file is needed
    cfg = parse_args(["--prompt", "x", "--dit-weight", str(folder), "--precision", "fp32"]).model
    with caplog.at_level(logging.INFO):
        ours = load_transformer(cfg, torch.device("cpu"))
    assert "DiT architecture from diffusers'" in caplog.text
    assert "differs from the --model preset" in caplog.text
    assert ours.config == TINY_DIT_TEST
    x = inputs()
    with torch.no_grad():
        got = ours(**x)
        want = twin(x["x"], x["t"], x["text_states"], x["text_mask"], x["text_states_2"], x["guidance"],
                    return_dict=False)[0]
    assert rel_err(got, want) <= 1e-5


def test_diffusers_config_round_trips_every_field():
    values = {"_class_name": "HunyuanVideoTransformer3DModel", "_diffusers_version": "0.35.0",
              **diffusers_dit_config(TINY_DIT_TEST)}
    assert dit_config_from_diffusers(json.loads(json.dumps(values))) == TINY_DIT_TEST


def test_image_to_video_configs_are_read():
    # hunyuanvideo-community/HunyuanVideo-I2V (-33ch): the I2V models are options of the same DiT (--i2v-mode)
    values = {"_class_name": "HunyuanVideoTransformer3DModel", "image_condition_type": "latent_concat",
              "in_channels": 33, "guidance_embeds": False}
    config = dit_config_from_diffusers(values)
    assert config.image_condition_type == "latent_concat" and config.in_channels == 33
    assert not config.guidance_embed
    with pytest.raises(ValueError, match="image_condition_type"):
        dit_config_from_diffusers({**values, "image_condition_type": "concat"})


def test_our_dit_config_wins_and_the_disagreement_is_logged(twin_and_folder, tmp_path, caplog):
    _, root = twin_and_folder
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "config.json").write_text((root / "transformer" / "config.json").read_text())
    other = TINY_DIT_TEST.with_updates(mm_single_blocks_depth=1)
    (folder / "dit_config.json").write_text(json.dumps(other.to_dict()))
    with caplog.at_level(logging.INFO):
        assert resolve_dit_config(TINY_DIT_TEST, folder) == other
    assert "describe different DiT architectures; using" in caplog.text
