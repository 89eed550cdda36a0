"""Reading DiT checkpoints in every accepted layout, strict checking, and meta-device assignment."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hyvideo.constants import HUNYUAN_VIDEO_CONFIG
from hyvideo.modules import (
    HYVideoDiffusionTransformer,
    build_dit,
    convert_diffusers_to_official,
    convert_official_to_diffusers,
    load_dit,
    load_dit_state_dict,
    load_dit_weights,
)
from tests.helpers import TINY_DIT_TEST, rel_err

TINY = TINY_DIT_TEST


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    model = HYVideoDiffusionTransformer(TINY, device="meta")
    return {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in model.state_dict().items()}


def forward(model):
    gen = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    inputs = (
        torch.randn(2, 4, 1, 4, 4, generator=gen),
        torch.tensor([10.0, 900.0]),
        torch.randn(2, 6, 32, generator=gen),
        mask,
        torch.randn(2, 16, generator=gen),
        torch.tensor([6016.0, 6016.0]),
    )
    with torch.no_grad():
        return model(*inputs)


def assert_same(state_dict, weights):
    assert state_dict.keys() == weights.keys()
    assert all(torch.equal(state_dict[k], weights[k]) for k in weights)


@pytest.mark.parametrize("load_key", ["module", "ema"])
def test_wrapped_pt_picks_the_load_key(tmp_path, weights, load_key):
    other = {k: v + 1 for k, v in weights.items()}
    wrapped = {"module": weights, "ema": other} if load_key == "module" else {"module": other, "ema": weights}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    assert_same(load_dit_state_dict(tmp_path / "ckpt.pt", load_key=load_key), weights)


def test_wrapped_pt_without_the_load_key_lists_the_keys(tmp_path, weights):
    torch.save({"module": weights, "step": torch.tensor(3)}, tmp_path / "ckpt.pt")
    with pytest.raises(KeyError, match=r"no 'ema' entry; available keys: \['module', 'step'\]"):
        load_dit_state_dict(tmp_path / "ckpt.pt", load_key="ema")


def test_flat_pt_and_directory_of_model_states(tmp_path, weights):
    torch.save(weights, tmp_path / "flat.pt")
    assert_same(load_dit_state_dict(tmp_path / "flat.pt"), weights)
    folder = tmp_path / "transformers"
    folder.mkdir()
    torch.save({"module": weights}, folder / "mp_rank_00_model_states.pt")
    torch.save({"module": {}}, folder / "mp_rank_00_model_states_fp8.pt")  # must not be picked
    assert_same(load_dit_state_dict(folder), weights)


def test_safetensors_file(tmp_path, weights):
    save_file(weights, str(tmp_path / "dit.safetensors"))
    assert_same(load_dit_state_dict(tmp_path / "dit.safetensors"), weights)


def test_diffusers_keys_match_the_diffusers_model_at_full_size():
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        theirs = HunyuanVideoTransformer3DModel(guidance_embeds=True).state_dict()
        ours = HYVideoDiffusionTransformer(HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"]).state_dict()
    converted = convert_official_to_diffusers(ours)
    assert len(converted) == len(theirs) == 1264
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    back = convert_diffusers_to_official(converted)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_diffusers_round_trip_gives_equal_outputs(tmp_path, weights):
    reference = forward(build_dit(TINY, weights, dtype=torch.float32, attention_backend="sdpa"))
    converted = convert_official_to_diffusers(weights)
    assert "norm_out.linear.weight" in converted and "final_layer.linear.weight" not in converted
    # single file with diffusers keys
    save_file(converted, str(tmp_path / "diffusers.safetensors"))
    from_file = load_dit_state_dict(tmp_path / "diffusers.safetensors")
    assert_same(from_file, weights)
    # sharded diffusers transformer directory with an index
    folder = tmp_path / "transformer"
    folder.mkdir()
    keys = sorted(converted)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, shard_keys in shards.items():
        save_file({k: converted[k] for k in shard_keys}, str(folder / name))
    index = {"weight_map": {k: name for name, shard_keys in shards.items() for k in shard_keys}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    model = load_dit(TINY, tmp_path, dtype=torch.float32, attention_backend="sdpa")  # finds transformer/
    assert torch.equal(forward(model), reference)
    # the final layer's (shift, scale) halves really are swapped in diffusers' layout
    shift, scale = weights["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(converted["norm_out.linear.weight"], torch.cat((scale, shift)))


def test_build_assigns_without_copying_and_keeps_final_linear_fp32(weights):
    model = build_dit(TINY, weights, dtype=torch.float32, attention_backend="sdpa")
    params = dict(model.named_parameters())
    assert all(params[k].data_ptr() == weights[k].data_ptr() for k in weights)  # assigned, not copied
    assert not any(p.is_meta for p in model.parameters()) and not model.training
    low = build_dit(TINY, weights, dtype=torch.bfloat16, attention_backend="sdpa")
    dtypes = {k: p.dtype for k, p in low.named_parameters()}
    assert dtypes.pop("final_layer.linear.weight") == dtypes.pop("final_layer.linear.bias") == torch.float32
    assert set(dtypes.values()) == {torch.bfloat16}
    assert rel_err(forward(low).float(), forward(model)) < 5e-2


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape", "guidance"])
def test_mismatched_state_dict_is_rejected_and_the_model_untouched(weights, damage):
    model = build_dit(TINY, {k: v.clone() for k, v in weights.items()}, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: v + 1 for k, v in weights.items()}  # would change every weight if it were loaded
    if damage == "missing":
        del bad["double_blocks.1.img_attn_qkv.weight"]
        message = "1 missing keys: double_blocks.1.img_attn_qkv.weight"
    elif damage == "unexpected":
        bad["double_blocks.9.img_attn_qkv.weight"] = torch.zeros(1)
        message = "1 unexpected keys: double_blocks.9.img_attn_qkv.weight"
    elif damage == "shape":
        bad["img_in.proj.bias"] = torch.zeros(65)
        message = r"1 shape mismatches: img_in.proj.bias: checkpoint \[65\] vs model \[64\]"
    else:
        bad = {k: v for k, v in bad.items() if not k.startswith("guidance_in")}
        message = "4 missing keys(.|\n)*HYVideo-T/2-cfgdistill has it"
    with pytest.raises(ValueError, match=message):
        load_dit_weights(model, bad)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_unreadable_or_absent_checkpoints_raise_clear_errors(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="could not read the DiT checkpoint"):
        load_dit_state_dict(tmp_path / "broken.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="could not read the DiT checkpoint"):
        load_dit_state_dict(tmp_path / "broken.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_dit_state_dict(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError):
        load_dit_state_dict(tmp_path / "absent.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=r"no DiT checkpoint.*notes.txt"):
        load_dit_state_dict(empty)
