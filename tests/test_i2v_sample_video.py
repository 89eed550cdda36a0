"""End to end: sample_video.py --i2v-mode on the tiny I2V tree; bad images exit 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

import sample_video
from hyvideo.i2v import image_to_tensor, resize_and_center_crop
from hyvideo.i2v.conditioning import encode_image_latents
from hyvideo.testing.tiny import write_tiny_checkpoints
from hyvideo.utils.file_utils import load_latents
from hyvideo.vae import load_vae

FP32 = [
    "--precision",
    "fp32",
    "--vae-precision",
    "fp32",
    "--text-encoder-precision",
    "fp32",
    "--text-encoder-precision-2",
    "fp32",
]
SMALL = [
    "--video-length",
    "5",
    "--infer-steps",
    "2",
    "--i2v-resolution",
    "360p",
    "--no-vae-tiling",
    "--crf",
    "0",
    *FP32,
]


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"), i2v=True)


@pytest.fixture
def cat_png(tmp_path) -> Path:
    y, x = np.mgrid[0:90, 0:160]
    pixels = np.stack([x * 255 // 160, y * 255 // 90, (x + y) % 256], axis=-1).astype(np.uint8)
    path = tmp_path / "cat.png"
    Image.fromarray(pixels, "RGB").save(path)
    return path


def test_first_frame_is_the_vae_reconstruction_of_the_bucketed_image(tiny_tree, cat_png, tmp_path, capsys):
    out = tmp_path / "results"
    code = sample_video.main(
        [
            "--model-base",
            str(tiny_tree),
            "--i2v-mode",
            "--i2v-image-path",
            str(cat_png),
            "--prompt",
            "A cat turns its head.",
            "--seed",
            "7",
            "--save-path",
            str(out),
            "--save-latents",
            *SMALL,
        ]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    (video,) = sorted(out.glob("*.mp4"))
    frames = iio.imread(video)
    assert frames.shape == (5, 352, 608, 3)  # the 360p bucket of a 16:9 image replaced --video-size
    latents, _ = load_latents(video.with_suffix(".safetensors"))
    # the expected first latent frame: the bucketed image through the VAE (untiled mean, scaled)
    vae = load_vae(tiny_tree / "hunyuan-video-i2v-720p" / "vae", dtype=torch.float32, device="cpu")
    crop = resize_and_center_crop(Image.open(cat_png).convert("RGB"), (352, 608))
    image_latents = encode_image_latents(vae, image_to_tensor(crop), vae_dtype=torch.float32)
    assert torch.equal(latents[:, :, :1], image_latents)  # held bit-exact through sampling
    with torch.no_grad():
        vae.disable_tiling()
        decoded = vae.decode(latents / vae.config.scaling_factor)  # what the CLI decoded
        alone = vae.decode(image_latents / vae.config.scaling_factor)  # the image's own reconstruction

    def to_uint8(x):  # (1, 3, T, H, W) in [-1, 1] -> frame 0 as (H, W, 3) in 0..255
        return ((x / 2 + 0.5).clamp(0, 1)[0, :, 0].permute(1, 2, 0).numpy() * 255).round()

    first = frames[0].astype(np.float64)
    # The written frame 0 is the decode of [image latent | sampled frames]; the mp4 (crf 0, yuv420p) only
    # subsamples chroma, so a few levels of mean error on this noisy content (~3.3 measured); another decode
    # (e.g. the last frame) is ~20 levels away.
    assert np.abs(first - to_uint8(decoded)).mean() < 6.0
    # The VAE's GroupNorms span all frames, so frame 0 is not exactly the single-image decode; with random
    # tiny weights it is still measurably nearer to it than the last frame is.
    recon = to_uint8(alone)
    assert np.abs(first - recon).mean() < np.abs(frames[-1].astype(np.float64) - recon).mean()
    sidecar = json.loads(video.with_suffix(".json").read_text())
    assert sidecar["size"][:2] == [352, 608]


@pytest.mark.parametrize("content, needle", [(b"not a png", "not a readable image"), (None, "no such file")])
def test_bad_image_exits_2_with_one_line_and_writes_nothing(tiny_tree, tmp_path, capsys, content, needle):
    image = tmp_path / "bad.png"
    if content is not None:
        image.write_bytes(content)
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exc:  # argparse-level (missing file) or the runner (undecodable)
        code = sample_video.main(
            [
                "--model-base",
                str(tiny_tree),
                "--i2v-mode",
                "--i2v-image-path",
                str(image),
                "--prompt",
                "a cat",
                "--save-path",
                str(out),
                *SMALL,
            ]
        )
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "--i2v-image-path" in err and len(err.splitlines()) == 1
    assert not any(out.glob("*")) if out.exists() else True
