"""Output utilities: uint8 conversion, file names, atomic mp4/JSON/latent writers, writable-dir check."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hyvideo.utils.data_utils import align_to, make_grid
from hyvideo.utils.file_utils import (
    check_writable_dir,
    load_latents,
    make_time_flag,
    safe_filename,
    save_latents,
    save_video,
    unique_path,
    video_to_uint8_frames,
    write_sidecar,
)

FILENAME_LIMIT = 255  # bytes, ext4 / NTFS / APFS


def _smooth_video(num_frames: int, height: int, width: int) -> torch.Tensor:
    """(1, 3, T, H, W) moving colour gradients: compresses well, so colour errors would show."""
    t = torch.arange(num_frames).view(-1, 1, 1) / max(num_frames, 1)
    y = torch.linspace(0, 1, height).view(1, -1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, -1)
    channels = [(x + t) % 1.0, y.expand(num_frames, height, width), 0.5 * (1 - x) + 0.25 * y]
    return torch.stack([c.expand(num_frames, height, width) for c in channels])[None].float()


def _read_frames(path: Path) -> np.ndarray:
    return iio.imread(path, plugin="FFMPEG")


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------------------------------
# data_utils
# --------------------------------------------------------------------------------------------------


def test_align_to_rounds_up():
    assert [align_to(v, 16) for v in (1, 16, 17, 720, 721, 1280)] == [16, 16, 32, 720, 736, 1280]
    assert align_to(0, 16) == 0
    with pytest.raises(ValueError, match="alignment"):
        align_to(10, 0)


def test_make_grid_layout_matches_torchvision_semantics():
    images = torch.rand(3, 3, 4, 5)
    assert torch.equal(make_grid(images[:1]), images[0])  # a lone image is returned unpadded
    grid = make_grid(images, nrow=1, padding=2, pad_value=0.0)
    assert grid.shape == (3, 3 * (4 + 2) + 2, 5 + 4)
    expected = torch.zeros(3, 20, 9)
    for k in range(3):
        expected[:, 2 + 6 * k : 6 + 6 * k, 2:7] = images[k]
    assert torch.equal(grid, expected)
    wide = make_grid(images, nrow=2, padding=1, pad_value=0.5)
    assert wide.shape == (3, 2 * 5 + 1, 2 * 6 + 1)
    assert torch.equal(wide[:, 6:10, 1:6], images[2]) and torch.all(wide[:, 6:10, 7:12] == 0.5)
    gray = make_grid(torch.rand(1, 1, 4, 5))
    assert gray.shape == (3, 4, 5)


# --------------------------------------------------------------------------------------------------
# uint8 conversion
# --------------------------------------------------------------------------------------------------


def test_uint8_conversion_truncates_like_upstream():
    values = torch.tensor([-0.5, 0.0, 0.5, 0.999, 1.0, 1.5, 200.4 / 255])
    video = values.view(1, 1, 1, 1, -1).expand(1, 3, 1, 1, -1)
    frames = video_to_uint8_frames(video)
    assert frames.dtype == np.uint8 and frames.shape == (1, 1, 7, 3)
    assert frames[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255, 200]
    # Upstream formula on random data: clamp, x·255 in fp32, numpy astype (truncation).
    video = torch.rand(1, 3, 2, 6, 8) * 1.2 - 0.1
    reference = (video[0].permute(1, 2, 3, 0).clamp(0, 1) * 255).numpy().astype(np.uint8)
    assert np.array_equal(video_to_uint8_frames(video), reference)
    rounded = torch.round(video[0].permute(1, 2, 3, 0).clamp(0, 1) * 255).to(torch.uint8).numpy()
    assert not np.array_equal(video_to_uint8_frames(video), rounded)


def test_uint8_conversion_tiles_a_batch_vertically():
    video = torch.rand(2, 3, 3, 6, 8)
    frames = video_to_uint8_frames(video)
    assert frames.shape == (3, 2 * (6 + 2) + 2, 8 + 4, 3)
    single = video_to_uint8_frames(video[1])
    assert np.array_equal(frames[:, 10:16, 2:10], single)
    assert frames[:, :2].max() == 0 and frames[:, :, :2].max() == 0  # black padding
    with pytest.raises(ValueError, match="shape"):
        video_to_uint8_frames(torch.rand(3, 6, 8))
    with pytest.raises(ValueError, match="float"):
        video_to_uint8_frames(torch.zeros(1, 3, 1, 2, 2, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------------


def test_time_flag_format_has_no_colons():
    flag = make_time_flag()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}", flag)


def test_safe_filename_strips_dangerous_characters():
    prompt = 'a/b\\c\nd\r\te  f:g*h?i"j<k>l|m\x00n\x1bo\u202ep\u200bq.  '
    name = safe_filename(prompt, seed=42, time_flag="2024-05-06-07:08:09")
    assert name == "2024-05-06-07-08-09_seed42_abc d e fghijklmnopq"
    for bad in '/\\:*?"<>|\n\r\t\x00':
        assert bad not in name
    assert not any(ord(ch) < 32 for ch in name)


def test_safe_filename_caps_length_in_bytes():
    long_ascii = safe_filename("x" * 1000, seed=7, time_flag="2024-01-01-00-00-00")
    assert long_ascii.startswith("2024-01-01-00-00-00_seed7_x")
    cjk_prompt = ("一只猫在草地上奔跑" * 34)[:300]
    assert len(cjk_prompt.encode("utf-8")) == 900
    cjk = safe_filename(cjk_prompt, seed=123456, time_flag="2024-01-01-00-00-00")
    for stem in (long_ascii, cjk):
        assert "\ufffd" not in stem  # never cut inside a character
        for suffix in ("_99.mp4", "_99.json", "_99.safetensors"):
            assert len((stem + suffix).encode("utf-8")) <= FILENAME_LIMIT
    assert "猫" in cjk
    tight = safe_filename("汉字" * 50, seed=1, time_flag="t", max_len=20)
    assert len(tight.encode("utf-8")) <= 20 and tight.startswith("t_seed1_")


def test_safe_filename_never_empty():
    assert safe_filename("", seed=0, time_flag="t") == "t_seed0_untitled"
    assert safe_filename(" \n\t/\\:*? .. ", seed=0, time_flag="t") == "t_seed0_untitled"
    with pytest.raises(ValueError, match="seed"):
        safe_filename("a", seed="1", time_flag="t")


def test_unique_path_never_overwrites(tmp_path):
    first = unique_path(tmp_path, "video", ".mp4")
    assert first == tmp_path / "video.mp4"
    first.write_bytes(b"1")
    second = unique_path(tmp_path, "video", "mp4")
    assert second == tmp_path / "video_1.mp4"
    second.write_bytes(b"2")
    assert unique_path(tmp_path, "video", ".mp4") == tmp_path / "video_2.mp4"
    (tmp_path / "clip.json").write_text("{}")
    assert unique_path(tmp_path, "clip", ".mp4", sibling_suffixes=(".json",)) == tmp_path / "clip_1.mp4"
    with pytest.raises(ValueError, match="separators"):
        unique_path(tmp_path, "../escape", ".mp4")


# --------------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------------


def test_save_video_round_trip(tmp_path):
    video = _smooth_video(9, 48, 64)
    out = save_video(video, tmp_path / "clip.mp4", fps=24)
    assert out == tmp_path / "clip.mp4" and _files(tmp_path) == ["clip.mp4"]
    assert _read_frames(out).shape == (9, 48, 64, 3)
    meta = iio.immeta(out, plugin="FFMPEG")
    assert meta["fps"] == 24 and "bt709" in meta["pix_fmt"]


def test_save_video_keeps_colours(tmp_path):
    # Solid blocks avoid chroma-subsampling edges, so a wrong RGB<->YUV matrix would show at once.
    colours = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 150, 40), (30, 60, 90)], np.uint8)
    frames = np.repeat(np.repeat(colours[:, None, None, :], 32, axis=1), 32, axis=2)
    decoded = _read_frames(save_video(frames, tmp_path / "solid.mp4"))
    diff = np.abs(decoded[:, 8:24, 8:24].astype(int) - frames[:, 8:24, 8:24].astype(int))
    assert diff.max() <= 4


def test_save_video_accepts_uint8_frames_and_batches(tmp_path):
    frames = video_to_uint8_frames(_smooth_video(5, 32, 48))
    save_video(frames, tmp_path / "array.mp4")
    save_video(iter(list(frames)), tmp_path / "iterator.mp4")
    save_video(torch.from_numpy(frames), tmp_path / "tensor.mp4")
    for name in ("array.mp4", "iterator.mp4", "tensor.mp4"):
        assert _read_frames(tmp_path / name).shape == (5, 32, 48, 3)
    batch = torch.cat([_smooth_video(5, 32, 48), _smooth_video(5, 32, 48).flip(-1)])
    save_video(batch, tmp_path / "grid.mp4")
    assert _read_frames(tmp_path / "grid.mp4").shape == (5, 2 * 34 + 2, 52, 3)


def test_crf_controls_file_size(tmp_path):
    video = _smooth_video(9, 64, 96) + 0.05 * torch.rand(1, 3, 9, 64, 96)
    fine = save_video(video, tmp_path / "fine.mp4", crf=10).stat().st_size
    coarse = save_video(video, tmp_path / "coarse.mp4", crf=40).stat().st_size
    assert fine > 2 * coarse


def test_failure_mid_write_leaves_nothing(tmp_path):
    frames = video_to_uint8_frames(_smooth_video(4, 32, 32))

    def broken(exc: BaseException):
        yield frames[0]
        yield frames[1]
        raise exc

    with pytest.raises(RuntimeError, match="decoder died"):
        save_video(broken(RuntimeError("decoder died")), tmp_path / "a.mp4")
    with pytest.raises(KeyboardInterrupt):
        save_video(broken(KeyboardInterrupt()), tmp_path / "b.mp4")
    bad_size = iter([frames[0], frames[1][:16]])
    with pytest.raises(ValueError, match="Frame 1 has size"):
        save_video(bad_size, tmp_path / "c.mp4")
    assert _files(tmp_path) == []


def test_ffmpeg_failure_is_reported_and_cleaned_up(tmp_path, monkeypatch):
    import imageio_ffmpeg

    false = shutil.which("false")
    if false is None:
        pytest.skip("needs the POSIX 'false' command as a failing stand-in for ffmpeg")
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: false)
    with pytest.raises(RuntimeError, match="ffmpeg failed with exit code 1"):
        save_video(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / "clip.mp4")
    assert _files(tmp_path) == []


def test_save_video_rejects_bad_input(tmp_path):
    good = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="even"):
        save_video(np.zeros((2, 15, 16, 3), np.uint8), tmp_path / "odd.mp4")
    with pytest.raises(ValueError, match="uint8"):
        save_video(np.zeros((2, 16, 16, 3), np.float32), tmp_path / "f.mp4")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        save_video(np.zeros((2, 16, 16, 4), np.uint8), tmp_path / "rgba.mp4")
    with pytest.raises(ValueError, match="no frames"):
        save_video(np.zeros((0, 16, 16, 3), np.uint8), tmp_path / "empty.mp4")
    with pytest.raises(ValueError, match="mp4"):
        save_video(good, tmp_path / "clip.avi")
    with pytest.raises(ValueError, match="crf"):
        save_video(good, tmp_path / "crf.mp4", crf=60)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_video(good, tmp_path / "missing" / "clip.mp4")
    assert _files(tmp_path) == []


def test_save_video_refuses_to_overwrite_unless_asked(tmp_path):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"precious")
    frames = np.full((2, 16, 16, 3), 128, np.uint8)
    with pytest.raises(FileExistsError, match="refusing"):
        save_video(frames, target)
    assert target.read_bytes() == b"precious" and _files(tmp_path) == ["clip.mp4"]
    save_video(frames, target, overwrite=True)
    assert _read_frames(target).shape == (2, 16, 16, 3)


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_video(np.zeros((1, 16, 16, 3), np.uint8), tmp_path / "clip.mp4")
        sidecar = write_sidecar(path, {"a": 1})
    finally:
        os.umask(old)
    for written in (path, sidecar):
        assert written.stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------------------------------
# Sidecar, latents
# --------------------------------------------------------------------------------------------------


def test_sidecar_round_trip(tmp_path):
    video_path = tmp_path / "2024_seed1_a cat. running.mp4"
    payload = {
        "prompt": "一只猫 runs",
        "size": (720, 1280),
        "ckpt": Path("/ckpts/model.pt"),
        "dtype": torch.bfloat16,
        "seeds": torch.tensor([1, 2]),
        "shift": np.float32(7.0),
        "steps": np.int64(50),
    }
    json_path = write_sidecar(video_path, payload)
    assert json_path == tmp_path / "2024_seed1_a cat. running.json"
    text = json_path.read_text(encoding="utf-8")
    assert "一只猫" in text and "\n  " in text  # ensure_ascii=False, indent=2
    assert json.loads(text) == {
        "prompt": "一只猫 runs",
        "size": [720, 1280],
        "ckpt": "/ckpts/model.pt",
        "dtype": "bfloat16",
        "seeds": [1, 2],
        "shift": 7.0,
        "steps": 50,
    }
    with pytest.raises(FileExistsError):
        write_sidecar(video_path, {"a": 1})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_sidecar(tmp_path / "x.mp4", {"bad": object()})
    assert sorted(_files(tmp_path)) == ["2024_seed1_a cat. running.json"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latents_round_trip(tmp_path, dtype):
    latents = torch.randn(1, 16, 3, 6, 10).to(dtype)
    meta = {"prompt": "猫", "seed": 3, "size": (48, 80), "vae": "884-16c-hy"}
    path = save_latents(tmp_path / "clip.safetensors", latents, meta)
    loaded, loaded_meta = load_latents(path)
    assert loaded.dtype == dtype and torch.equal(loaded, latents)
    assert loaded_meta == {"prompt": "猫", "seed": 3, "size": [48, 80], "vae": "884-16c-hy"}
    assert _files(tmp_path) == ["clip.safetensors"]


def test_load_latents_rejects_foreign_files(tmp_path):
    save_file({"latents": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a hyvideo latent file"):
        load_latents(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        load_latents(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_latents(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------------------------------
# Writable directory
# --------------------------------------------------------------------------------------------------


def test_check_writable_dir_creates_nested_dirs(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_writable_dir(target) == target and target.is_dir()
    assert _files(target) == []  # the probe file is gone


def test_check_writable_dir_names_the_bad_path(tmp_path):
    blocker = tmp_path / "some_file"
    blocker.write_text("x")
    # A directory below a regular file can never be created, even as root.
    with pytest.raises(ValueError, match=re.escape(str(blocker / "sub"))):
        check_writable_dir(blocker / "sub")
    with pytest.raises(ValueError, match="not a directory"):
        check_writable_dir(blocker)
