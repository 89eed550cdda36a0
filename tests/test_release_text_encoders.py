"""Freeing the text encoders after a run's last prompt: same video, nothing holds them, clear reuse error."""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch

import sample_video
from hyvideo.config import parse_args
from hyvideo.lowmem.release import weight_bytes
from hyvideo.testing.tiny import write_tiny_checkpoints
from hyvideo.utils.file_utils import load_latents

SMALL = ["--video-size", "32", "32", "--video-length", "1", "--infer-steps", "2", "--precision", "fp32",
         "--vae-precision", "fp32", "--text-encoder-precision", "fp32", "--text-encoder-precision-2", "fp32",
         "--seed", "5"]
KWARGS = dict(height=32, width=32, video_length=1, seed=5, infer_steps=2, show_progress=False)


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


def sampler_for(tree: Path, offload_mode: str):
    from hyvideo.inference import HunyuanVideoSampler

    configs = parse_args(["--model-base", str(tree), *SMALL, "--prompt", "x", "--offload-mode", offload_mode])
    return HunyuanVideoSampler.from_pretrained(configs)


@pytest.mark.parametrize("offload_mode", ["none", "model", "block"])
def test_released_encoders_give_the_same_video_and_are_garbage(tiny_tree, offload_mode):
    sampler = sampler_for(tiny_tree, offload_mode)
    kept = sampler.predict("a red ball", guidance_scale=1.5, **KWARGS)  # CFG: the negative is encoded too
    expected_bytes = weight_bytes([sampler.text_encoder, sampler.text_encoder_2])
    alive = [weakref.ref(sampler.text_encoder), weakref.ref(sampler.text_encoder_2)]
    released = sampler.predict("a red ball", guidance_scale=1.5, release_text_encoders=True, **KWARGS)
    assert torch.equal(released.latents, kept.latents) and torch.equal(released.samples, kept.samples)
    gc.collect()
    # Nothing (sampler, pipeline, offload plan, offload hooks) keeps them: their memory really is free.
    assert [ref() for ref in alive] == [None, None]
    assert expected_bytes > 0
    if sampler.offload is not None:
        plan = sampler.offload
        assert plan.components["text_encoder"] is None and "text_encoder" not in plan.offloaders
    with pytest.raises(ValueError, match="released after the last prompt.*load the sampler again"):
        sampler.predict("another prompt", **KWARGS)


def test_cli_releases_after_the_last_prompt_only(tiny_tree, tmp_path, capsys, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue cube\n", encoding="utf-8")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="hyvideo.inference"):
        code = sample_video.main(["--model-base", str(tiny_tree), "--save-path", str(out), "--save-latents",
                                  *SMALL, "--prompt-file", str(prompts)])
    assert code == 0, capsys.readouterr().err
    releases = [r.getMessage() for r in caplog.records if "Text encoders released" in r.getMessage()]
    assert len(releases) == 1 and "GiB of weights freed" in releases[0]
    # The release came inside the second (last) prompt's call, and both videos were written.
    messages = [r.getMessage() for r in caplog.records]
    starts = [i for i, m in enumerate(messages) if m.startswith("Sampling ")]
    ends = [i for i, m in enumerate(messages) if m.startswith("Success")]
    assert len(starts) == len(ends) == 2 and starts[1] < messages.index(releases[0]) < ends[1]
    assert len(sorted(out.glob("*.safetensors"))) == 2
    (first, _) = [load_latents(p)[0] for p in sorted(out.glob("*.safetensors"))]
    assert torch.isfinite(first).all()
