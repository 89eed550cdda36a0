"""--lora on the command line and the sampler's LoRA API, end to end on the tiny checkpoint tree."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sample_video
from hyvideo.config import parse_args, split_lora_arg
from hyvideo.modules import HYVideoDiffusionTransformer
from hyvideo.testing.loras import random_diffusers_lora, to_kohya_layout, to_original_layout
from hyvideo.testing.tiny import TINY_DIT, write_tiny_checkpoints
from hyvideo.utils.file_utils import load_latents

SMALL = ["--video-size", "32", "32", "--video-length", "1", "--infer-steps", "2", "--precision", "fp32",
         "--vae-precision", "fp32", "--text-encoder-precision", "fp32", "--text-encoder-precision-2", "fp32",
         "--seed", "5", "--prompt", "a red ball"]


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    meta = HYVideoDiffusionTransformer(TINY_DIT, device="meta")
    a = random_diffusers_lora(meta, rank=4, std=0.3, seed=1)
    b = random_diffusers_lora(meta, rank=2, std=0.3, seed=2, select=lambda n: "double_blocks" in n)
    bigger = HYVideoDiffusionTransformer(TINY_DIT.with_updates(hidden_size=128, heads_num=4), device="meta")
    files = {
        "a": to_original_layout(a, meta),
        "b": to_kohya_layout(b, meta, alpha=1.0),
        "other_size": to_original_layout(random_diffusers_lora(bigger, rank=2), bigger),
        "other_model": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
                        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)},
    }
    paths = {}
    for name, tensors in files.items():
        paths[name] = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(paths[name]))
    paths["pickle"] = folder / "a.ckpt"
    torch.save(files["a"], paths["pickle"])
    return paths


def sample(tiny_tree: Path, out: Path, capsys, *extra: str) -> tuple[torch.Tensor, dict]:
    code = sample_video.main(["--model-base", str(tiny_tree), "--save-path", str(out), "--save-latents",
                              *SMALL, *extra])
    assert code == 0, capsys.readouterr().err
    (path,) = sorted(out.glob("*.safetensors"))
    return load_latents(path)[0], json.loads(path.with_suffix(".json").read_text())


def test_split_lora_arg():
    assert split_lora_arg("x.safetensors:0.5") == ("x.safetensors", 0.5)
    assert split_lora_arg("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", None)
    assert split_lora_arg("x.safetensors:-1e-1") == ("x.safetensors", -0.1)
    assert split_lora_arg("x.safetensors") == ("x.safetensors", None)


def test_cli_and_api_apply_the_same_loras(tiny_tree, loras, tmp_path, capsys):
    from hyvideo.inference import HunyuanVideoSampler

    plain, plain_record = sample(tiny_tree, tmp_path / "plain", capsys)
    off, _ = sample(tiny_tree, tmp_path / "off", capsys, "--lora", f"{loras['a']}:0")
    assert torch.equal(plain, off)  # scale 0 equals no LoRA
    both, record = sample(tiny_tree, tmp_path / "both", capsys, "--lora", str(loras["a"]), "--lora",
                          str(loras["b"]), "--lora-scale", "0.5", "--lora-scale", "-1")
    assert not torch.allclose(both, plain, atol=1e-3)
    assert "loras" not in plain_record
    sha = hashlib.sha256(loras["a"].read_bytes()).hexdigest()
    assert [(r["file"], r["scale"]) for r in record["loras"]] == [("a.safetensors", 0.5), ("b.safetensors", -1.0)]
    assert record["loras"][0]["sha256"] == sha and record["loras"][1]["layout"] == "kohya"
    # The API: one loaded model, LoRAs swapped between prompts.
    configs = parse_args(["--model-base", str(tiny_tree), *SMALL])
    sampler = HunyuanVideoSampler.from_pretrained(configs)
    kwargs = dict(height=32, width=32, video_length=1, seed=5, infer_steps=2, show_progress=False)
    sampler.load_lora(loras["a"], scale=0.5)
    sampler.load_lora(loras["b"], scale=-1.0, name="second")
    assert torch.equal(sampler.predict("a red ball", **kwargs).latents, both)
    sampler.set_lora_scale("a", 0.0)
    sampler.set_lora_scale("second", 0.0)
    assert torch.equal(sampler.predict("a red ball", **kwargs).latents, plain)
    sampler.unload_loras()
    out = sampler.predict("a red ball", **kwargs)
    assert torch.equal(out.latents, plain) and out.loras == []


@pytest.mark.parametrize(
    "lora_args, needle",
    [
        (["--lora", "{other_model}"], "match no layer"),
        (["--lora", "{other_size}"], "does not fit"),
        (["--lora", "{pickle}"], "pickles"),
        (["--lora", "/nonexistent/x.safetensors"], "no such file"),
        (["--lora", "{a}:nan"], "finite"),
        (["--lora", "{a}", "--lora-scale", "1", "--lora-scale", "2"], "--lora-scale given 2 times"),
        (["--lora", "{a}:0.5", "--lora-scale", "1"], "give one"),
    ],
    ids=["wrong-model", "wrong-shapes", "pickle", "missing", "nan-scale", "too-many-scales", "two-scales"],
)
def test_bad_loras_exit_2_with_one_line_and_write_nothing(tiny_tree, loras, tmp_path, capsys, lora_args, needle):
    out = tmp_path / "never"
    argv = ["--model-base", str(tiny_tree), "--save-path", str(out), *SMALL,
            *(a.format(**{k: str(v) for k, v in loras.items()}) for a in lora_args)]
    try:
        code = sample_video.main(argv)
    except SystemExit as exc:  # flag validation exits from argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists() or not any(out.iterdir())
