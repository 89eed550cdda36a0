"""--vae-tile-size / --vae-tile-frames: validated, applied when the VAE is loaded, recorded, and advised by the
memory plan; and videos longer than the original's 192-frame limit (its issue #223) end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo

import sample_video
from hyvideo.config import build_parser, configs_from_args
from hyvideo.inference import load_vae_component
from hyvideo.testing.tiny import TINY_VAE, write_tiny_checkpoints
from hyvideo.vae import load_vae
from tests.helpers import rel_err

SMALL = ["--infer-steps", "1", "--precision", "fp32", "--vae-precision", "fp32", "--text-encoder-precision",
         "fp32", "--text-encoder-precision-2", "fp32"]


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


def _model_config(tree: Path, *flags: str):
    args = build_parser().parse_args(["--model-base", str(tree), "--prompt", "x", *SMALL, *flags])
    return configs_from_args(args).model


def _diffusers_vae(ours, size: int, frames: int) -> AutoencoderKLHunyuanVideo:
    """diffusers' HunyuanVideo VAE with our weights and the original's tiling at the given tile sizes."""
    ref = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=TINY_VAE["latent_channels"],
        block_out_channels=tuple(TINY_VAE["block_out_channels"]), layers_per_block=TINY_VAE["layers_per_block"],
        norm_num_groups=TINY_VAE["norm_num_groups"],
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref.use_tiling = ref.use_framewise_decoding = True  # diffusers_peer.md §2.2: the official geometry
    ref.tile_sample_min_height = ref.tile_sample_min_width = size
    ref.tile_sample_stride_height = ref.tile_sample_stride_width = int(size * 0.75)
    ref.tile_sample_min_num_frames, ref.tile_sample_stride_num_frames = frames, int(frames * 0.75)
    return ref


@torch.no_grad()
def test_tile_flags_set_the_decode_tiles_and_match_the_reference(tiny_tree):
    # The tiny VAE's own tiles are 64 px / 16 frames; the flags halve the spatial tile and double the temporal.
    vae = load_vae_component(_model_config(tiny_tree, "--vae-tile-size", "32", "--vae-tile-frames", "32"),
                             torch.device("cpu"))
    assert (vae.tile_geometry.sample_size, vae.tile_geometry.sample_tsize) == (32, 32)
    z = torch.randn(1, 16, 9, 5, 6, generator=torch.Generator().manual_seed(0))
    plan = vae.plan_decode_tiles(z.shape)
    assert plan.num_t > 1 and plan.num_rows > 1 and plan.num_cols > 1
    video = vae.decode(z)
    reference = _diffusers_vae(vae, 32, 32).decode(z).sample
    assert video.shape == reference.shape == (1, 3, 33, 40, 48)
    # Same tolerance as tests/test_vae.py's tiled parity with diffusers (fp32, different op order).
    assert rel_err(video, reference) <= 1e-5


@torch.no_grad()
def test_without_flags_the_vae_keeps_its_own_tiles_exactly(tiny_tree):
    vae = load_vae_component(_model_config(tiny_tree), torch.device("cpu"))
    plain = load_vae(tiny_tree / "hunyuan-video-t2v-720p" / "vae", dtype=torch.float32, device="cpu")
    assert vae.tile_geometry == plain.tile_geometry
    assert (vae.tile_geometry.sample_size, vae.tile_geometry.sample_tsize) == (64, 16)
    z = torch.randn(1, 16, 9, 5, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(vae.decode(z), plain.decode(z))


@pytest.mark.parametrize("flags,needle", [
    (["--vae-tile-size", "100"], "--vae-tile-size must be a positive multiple of 32"),
    (["--vae-tile-size", "0"], "--vae-tile-size must be a positive multiple of 32"),
    (["--vae-tile-frames", "8"], "--vae-tile-frames must be a positive multiple of 16"),
    (["--vae-tile-frames", "40"], "--vae-tile-frames must be a positive multiple of 16"),
    (["--vae-tile-size", "128", "--no-vae-tiling"], "drop --no-vae-tiling"),
], ids=["not-multiple", "zero", "too-few-frames", "frames-not-multiple", "tiling-off"])
def test_bad_tile_flags_exit_2_with_one_line(tiny_tree, tmp_path, capsys, flags, needle):
    out = tmp_path / "never"
    try:
        code = sample_video.main(["--model-base", str(tiny_tree), "--prompt", "x", "--save-path", str(out),
                                  *flags])
    except SystemExit as exc:  # flag validation exits from argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err
    assert not out.exists()


def test_plan_memory_names_the_tile_flags_and_plans_the_given_tiles(tmp_path, capsys):
    # At 256x256x65 with fp8 + block offload, decoding with the default 256 px / 64 frame tiles needs
    # ~10.4 GiB (traced), so an 8 GiB card needs smaller tiles.
    base = ["--plan-memory", "8", "--video-size", "256", "256", "--video-length", "65", "--use-fp8",
            "--use-cpu-offload", "--model-base", str(tmp_path / "no-weights-needed")]
    assert sample_video.main(base) == 0
    out = capsys.readouterr().out
    advice = re.search(r"run with --vae-tile-size (\d+) --vae-tile-frames (\d+)", out)
    assert advice and "so that decoding fits" in out, out
    assert sample_video.main([*base, "--vae-tile-size", advice[1], "--vae-tile-frames", advice[2]]) == 0
    out = capsys.readouterr().out
    assert f"{advice[1]}/{advice[2]}" in out and "fits a 8 GiB card" in out and "reduced" not in out


def test_241_frames_end_to_end_with_many_temporal_tiles(tiny_tree, tmp_path, capsys):
    # 241 frames = 61 latents; the tiny VAE's 16-frame tiles (4 latents, stride 3) give 20 temporal tiles.
    # The original broke beyond 192 frames (its issue #223).
    out = tmp_path / "results"
    code = sample_video.main(["--model-base", str(tiny_tree), "--prompt", "a long walk", "--seed", "5",
                              "--save-path", str(out), "--video-size", "32", "32", "--video-length", "241",
                              *SMALL])
    assert code == 0, capsys.readouterr().err
    (video,) = sorted(out.glob("*.mp4"))
    assert iio.imread(video).shape == (241, 32, 32, 3)
    settings = json.loads(video.with_suffix(".json").read_text(encoding="utf-8"))["settings"]
    assert settings["sampling"]["video_length"] == 241
    assert settings["model"]["vae_tile_size"] is None and settings["model"]["vae_tile_frames"] is None


def test_tile_flags_are_recorded_in_the_sidecar(tiny_tree, tmp_path, capsys):
    out = tmp_path / "results"
    code = sample_video.main(["--model-base", str(tiny_tree), "--prompt", "x", "--seed", "1", "--save-path",
                              str(out), "--video-size", "64", "64", "--video-length", "33",
                              "--vae-tile-size", "32", "--vae-tile-frames", "32", *SMALL])
    assert code == 0, capsys.readouterr().err
    (video,) = sorted(out.glob("*.mp4"))
    assert iio.imread(video).shape == (33, 64, 64, 3)
    settings = json.loads(video.with_suffix(".json").read_text(encoding="utf-8"))["settings"]
    assert (settings["model"]["vae_tile_size"], settings["model"]["vae_tile_frames"]) == (32, 32)


def test_memory_check_plans_the_given_tiles(tiny_tree, monkeypatch):
    import hyvideo.lowmem.memory_check as memory_check
    from hyvideo.config import parse_args

    monkeypatch.setattr(memory_check, "describes_released_models", lambda *folders: True)
    base = ["--prompt", "x", "--model-base", str(tiny_tree), "--video-size", "256", "256", "--video-length",
            "65", "--use-fp8", "--use-cpu-offload"]
    # "meta" stands in for an 8 GiB accelerator; the default 256 px / 64 frame tiles need ~10 GiB to decode.
    default = memory_check.memory_verdict(parse_args(base), device=torch.device("meta"), available_bytes=8 << 30)
    smaller = memory_check.memory_verdict(parse_args([*base, "--vae-tile-size", "128"]),
                                          device=torch.device("meta"), available_bytes=8 << 30)
    assert not default.fits and default.stage == "decode" and smaller.fits
    assert smaller.needed_gib < default.needed_gib - 2
