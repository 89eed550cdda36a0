"""Causal 3-D VAE: parity with diffusers (all tiling modes), causality, tiling plan, blending and loading."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import AutoencoderKLHunyuanVideo
from safetensors.torch import save_file

from hyvideo.vae import AutoencoderKLCausal3D, TileGeometry, VAEConfig, load_vae
from hyvideo.vae.tiling import blend_into
from hyvideo.vae.unet_causal_3d_blocks import (
    CausalConv3d,
    GroupNorm32,
    block_causal_attention,
    needs_fp32_strided_conv,
    prepare_causal_attention_mask,
    upsample_nearest_first_frame_separately,
)
from tests.helpers import rel_err

MANIFEST = Path(__file__).resolve().parent / "data" / "official_vae_state_dict_keys.tsv"
# Tiny model whose tiles (32 px / 4 latent, 16 frames / 4 latent) trigger at tiny sizes.
TINY = VAEConfig(
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=32,
    sample_tsize=16,
)
# Official config.json as published with the checkpoint (public copies).
OFFICIAL_CONFIG_JSON = {
    "_class_name": "AutoencoderKLCausal3D",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlockCausal3D"] * 4,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "sample_tsize": 64,
    "up_block_types": ["UpDecoderBlockCausal3D"] * 4,
    "scaling_factor": 0.476986,
    "time_compression_ratio": 4,
    "mid_block_add_attention": True,
}
MODES = {"none": (False, False), "spatial": (True, False), "temporal": (False, True), "both": (True, True)}


def _tiny_model(config: VAEConfig = TINY, seed: int = 0) -> AutoencoderKLCausal3D:
    torch.manual_seed(seed)
    model = AutoencoderKLCausal3D(config).eval()
    with torch.no_grad():  # non-trivial GroupNorm affines, so wrong norm wiring shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models() -> tuple[AutoencoderKLCausal3D, AutoencoderKLHunyuanVideo]:
    ours = _tiny_model()
    ref = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=TINY.latent_channels,
        block_out_channels=TINY.block_out_channels,
        layers_per_block=TINY.layers_per_block,
        norm_num_groups=TINY.norm_num_groups,
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # same key names, no mapping
    return ours, ref


def _set_modes(ours, ref, spatial: bool, temporal: bool) -> None:
    ours.use_spatial_tiling, ours.use_temporal_tiling = spatial, temporal
    # diffusers_peer.md §2.2: the official geometry expressed in diffusers' attributes.
    size, tsize = TINY.sample_size, TINY.sample_tsize
    ref.use_tiling = spatial
    ref.use_framewise_encoding = ref.use_framewise_decoding = temporal
    ref.tile_sample_min_height = ref.tile_sample_min_width = size
    ref.tile_sample_stride_height = ref.tile_sample_stride_width = int(size * 0.75)
    ref.tile_sample_min_num_frames, ref.tile_sample_stride_num_frames = tsize, int(tsize * 0.75)


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@torch.no_grad()
def test_parity_with_diffusers(models, mode):
    ours, ref = models
    spatial, temporal = MODES[mode]
    _set_modes(ours, ref, spatial, temporal)
    # Temporal tiles start at frames 0, 12, 24 (encode) and latents 0, 3, 6 (decode): the last of each is a
    # single frame/latent that the original computes and then drops entirely (we skip it).
    x = torch.randn(1, 3, 25, 40, 48)
    z = torch.randn(1, TINY.latent_channels, 7, 5, 6)
    enc_plan, dec_plan = ours.plan_encode_tiles(x.shape), ours.plan_decode_tiles(z.shape)
    assert (enc_plan.temporal is not None, enc_plan.spatial_rows is not None) == (temporal, spatial)
    assert (dec_plan.temporal is not None, dec_plan.spatial_rows is not None) == (temporal, spatial)

    moments = ours.encode(x).parameters
    ref_moments = ref.encode(x).latent_dist.parameters
    assert moments.shape == ref_moments.shape == (1, 2 * TINY.latent_channels, 7, 5, 6)
    assert rel_err(moments, ref_moments) <= 1e-5

    video = ours.decode(z)
    ref_video = ref.decode(z).sample
    assert video.shape == ref_video.shape == (1, 3, 25, 40, 48)
    assert rel_err(video, ref_video) <= 1e-5


@torch.no_grad()
def test_tiling_changes_numbers(models):
    """Tiles see different GroupNorm statistics, so geometry matters (why parity needs the same tiles)."""
    ours, _ = models
    z = torch.randn(1, TINY.latent_channels, 7, 5, 6)
    ours.disable_tiling()
    untiled = ours.decode(z)
    ours.enable_tiling()
    tiled = ours.decode(z)
    assert rel_err(tiled, untiled) > 1e-3


@torch.no_grad()
def test_tiles_decoded_independently_blend_to_the_same_video(models):
    ours, _ = models
    ours.enable_tiling()
    z = torch.randn(1, TINY.latent_channels, 6, 5, 6)
    plan = ours.plan_decode_tiles(z.shape)
    assert (plan.num_t, plan.num_rows, plan.num_cols) == (2, 2, 2)
    order = list(plan.tiles)
    random.Random(0).shuffle(order)  # e.g. different ranks, any order
    decoded = {tile.index: ours.decode_tile(z, tile) for tile in order}
    video = ours.blend_decoded_tiles([decoded[i] for i in range(len(plan.tiles))], plan)
    assert torch.equal(video, ours.decode(z))
    assert video.shape == (1, 3, 21, 40, 48)


# ---------------------------------------------------------------------------------------------------------
# Tiling geometry and blending
# ---------------------------------------------------------------------------------------------------------


def test_official_tile_geometry():
    g = VAEConfig().tile_geometry()
    rules = (g.decode_spatial, g.decode_temporal, g.encode_spatial, g.encode_temporal)
    # (tile length, stride) in input units, (blend, keep) in output units, spec §5.5.
    got = [(r.length, r.stride, r.blend, r.keep) for r in rules]
    assert got == [(32, 24, 64, 192), (17, 12, 16, 48), (256, 192, 8, 24), (65, 48, 4, 12)]
    with torch.device("meta"):  # planning needs no weights
        model = AutoencoderKLCausal3D()
    plan = model.plan_decode_tiles((1, 16, 33, 90, 160))  # 720p, 129 frames
    assert (plan.num_t, plan.num_rows, plan.num_cols) == (3, 4, 7)
    assert [t.region[0] for t in plan.tiles[:: 4 * 7]] == [slice(0, 17), slice(12, 29), slice(24, 41)]
    assert plan.tiles[-1].region[1:] == (slice(72, 104), slice(144, 176))
    assert not model.plan_decode_tiles((1, 16, 16, 32, 32)).is_tiled


def test_tile_geometry_rejects_misaligned_tiles():
    with pytest.raises(ValueError, match="does not tile evenly"):
        TileGeometry(sample_size=32, sample_tsize=8)  # 6-frame encode stride is not a latent frame


def _blend_loop(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """The original's blend_{t,v,h}: one Python-float weighted sum per index along `dim`."""
    e = min(a.shape[dim], b.shape[dim], extent)
    for y in range(e):
        b.select(dim, y).copy_(a.select(dim, a.shape[dim] - e + y) * (1 - y / e) + b.select(dim, y) * (y / e))
    return b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [-1, -2, -3])
def test_blend_is_bit_identical_to_the_original_loop(dtype, dim):
    for a_len, b_len, extent in [(12, 10, 6), (5, 9, 8), (7, 7, 64)]:
        shape_a, shape_b = [1, 2, 7, 7, 7], [1, 2, 7, 7, 7]
        shape_a[dim], shape_b[dim] = a_len, b_len
        a, b = torch.randn(shape_a, dtype=dtype), torch.randn(shape_b, dtype=dtype)
        expected = _blend_loop(a, b.clone(), extent, dim)
        out = blend_into(a, b, extent, dim)
        assert out is b and torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------------------
# Causality
# ---------------------------------------------------------------------------------------------------------


class FrozenGroupNormStats:
    """Patches GroupNorm32 to record per-call statistics once, then replay them in the same call order.

    GroupNorm statistics span all frames (as in the original), the one non-causal part of the model. With
    them frozen, any other dependence of early outputs on later frames must come from a non-causal op.
    """

    def __init__(self, monkeypatch) -> None:
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.replaying, self.cursor = False, 0
        monkeypatch.setattr(GroupNorm32, "forward", self._forward_factory())

    def replay(self) -> None:
        self.replaying, self.cursor = True, 0

    def _forward_factory(self):
        recorder = self

        def forward(norm, x, silu=False, pad=None):
            B, C = x.shape[:2]
            grouped = x.reshape(B, norm.num_groups, -1)
            if recorder.replaying:
                mean, var = recorder.stats[recorder.cursor]
                recorder.cursor += 1
            else:
                var, mean = torch.var_mean(grouped, dim=-1, unbiased=False, keepdim=True)
                recorder.stats.append((mean, var))
            h = ((grouped - mean) * torch.rsqrt(var + norm.eps)).reshape(x.shape)
            affine_shape = (1, C) + (1,) * (x.ndim - 2)
            h = h * norm.weight.view(affine_shape) + norm.bias.view(affine_shape)
            h = F.silu(h) if silu else h
            return h if pad is None else F.pad(h, pad, mode="replicate")

        return forward


@torch.no_grad()
def test_encoder_is_causal_given_groupnorm_statistics(monkeypatch):
    model = _tiny_model().double()  # float64: rounding noise far below any causality leak
    model.disable_tiling()
    x = torch.randn(1, 3, 13, 16, 16, dtype=torch.float64)
    changed = x.clone()
    changed[:, :, 5:] = torch.randn_like(changed[:, :, 5:])
    # Without freezing, frame-0 latents move: GroupNorm over (C/G, T, H, W) is inherited from the original.
    assert rel_err(model.encode(changed).mode()[:, :, :2], model.encode(x).mode()[:, :, :2]) > 1e-3

    frozen = FrozenGroupNormStats(monkeypatch)
    latents = model.encode(x).mode()  # (1, C, 4, 2, 2); records statistics
    frozen.replay()
    latents_changed = model.encode(changed).mode()
    # Latent frames 0 and 1 cover input frames 0..4 only.
    assert rel_err(latents_changed[:, :, :2], latents[:, :, :2]) <= 1e-10
    assert rel_err(latents_changed[:, :, 2:], latents[:, :, 2:]) > 1e-3
    frozen.replay()
    image_latent = model.encode(x[:, :, :1]).mode()
    assert image_latent.shape == (1, TINY.latent_channels, 1, 2, 2)
    assert rel_err(image_latent, latents[:, :, :1]) <= 1e-10


@torch.no_grad()
def test_decoder_is_causal_given_groupnorm_statistics(monkeypatch):
    model = _tiny_model().double()
    model.disable_tiling()
    z = torch.randn(1, TINY.latent_channels, 4, 2, 2, dtype=torch.float64)
    changed = z.clone()
    changed[:, :, 2:] = torch.randn_like(changed[:, :, 2:])
    frozen = FrozenGroupNormStats(monkeypatch)
    video = model.decode(z)  # (1, 3, 13, 16, 16)
    frozen.replay()
    video_changed = model.decode(changed)
    # Latents 0 and 1 decode to frames 0..4.
    assert rel_err(video_changed[:, :, :5], video[:, :, :5]) <= 1e-10
    assert rel_err(video_changed[:, :, 5:], video[:, :, 5:]) > 1e-3
    frozen.replay()
    image = model.decode(z[:, :, :1])
    assert image.shape == (1, 3, 1, 16, 16)
    assert rel_err(image, video[:, :, :1]) <= 1e-10


@torch.no_grad()
def test_static_video_encodes_like_its_image():
    """Replicate padding in front of time: a still video's latents all equal the image's latent."""
    model = _tiny_model().double()
    image = torch.randn(1, 3, 1, 16, 24, dtype=torch.float64)
    image_latent = model.encode(image).mode()
    video_latents = model.encode(image.expand(-1, -1, 9, -1, -1)).mode()
    assert video_latents.shape == (1, TINY.latent_channels, 3, 2, 3)
    for t in range(3):
        assert rel_err(video_latents[:, :, t : t + 1], image_latent) <= 1e-10
    frames = model.decode(image_latent.expand(-1, -1, 3, -1, -1))
    still = model.decode(image_latent)
    assert frames.shape == (1, 3, 9, 16, 24) and still.shape == (1, 3, 1, 16, 24)
    for t in range(9):
        assert rel_err(frames[:, :, t : t + 1], still) <= 1e-10


@torch.no_grad()
def test_frame_count_rules_and_shapes():
    model = _tiny_model()
    model.disable_tiling()
    for frames, latents in [(1, 1), (5, 2), (9, 3)]:
        posterior = model.encode(torch.randn(2, 3, frames, 16, 8))
        assert posterior.mode().shape == (2, TINY.latent_channels, latents, 2, 1)
        assert model.decode(posterior.mode()).shape == (2, 3, frames, 16, 8)
    with pytest.raises(ValueError, match="4k\\+1 frames.*got 6"):
        model.encode(torch.randn(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="5-D latent"):
        model.decode(torch.randn(1, 3, 2, 2, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_weights_follow_fp32(models, dtype):
    ours, _ = models
    ours.enable_tiling()
    low = _tiny_model().to(dtype)
    x, z = torch.randn(1, 3, 5, 40, 8), torch.randn(1, TINY.latent_channels, 2, 5, 1)  # 2 spatial tiles
    moments, video = low.encode(x).parameters, low.decode(z)  # fp32 inputs are cast on entry
    assert moments.dtype == video.dtype == dtype
    assert rel_err(moments, ours.encode(x).parameters) <= 0.05
    assert rel_err(video, ours.decode(z)) <= 0.1


def _cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# The shape of the upstream failure: 32 channels, 3 frames, 5 x 1 pixels, padded by the causal conv.
NARROW_INPUTS = [(1, 32, 3, 5, 1), (1, 32, 3, 2, 2), (2, 16, 5, 1, 6), (1, 32, 4, 12, 10)]


@pytest.mark.skipif(not _cpu_has_amx(), reason="the upstream bf16 strided Conv3d bug shows only on AMX CPUs")
@torch.no_grad()
def test_raw_cpu_bf16_strided_conv3d_is_wrong_on_this_cpu():
    # Documents why the workaround exists: the raw kernel, fed what the VAE's downsampler feeds it.
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(32, 32, 3, stride=(2, 2, 2))
    x = F.pad(torch.randn(1, 32, 3, 5, 1), (1, 1, 1, 1, 2, 0), mode="replicate")
    expected = conv(x)
    raw = conv.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert not (rel_err(raw, expected) <= 0.1)  # NaN counts as wrong too


@pytest.mark.parametrize("shape", NARROW_INPUTS)
@pytest.mark.parametrize("stride", [(1, 2, 2), (2, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_strided_causal_conv_is_right_in_low_precision_on_cpu(shape, stride, dtype):
    torch.manual_seed(0)
    conv = CausalConv3d(shape[1], shape[1], 3, stride=stride)
    x = torch.randn(shape)
    expected = conv(x)
    low = CausalConv3d(shape[1], shape[1], 3, stride=stride).to(dtype)
    low.load_state_dict(conv.state_dict())
    out = low(x.to(dtype))
    assert out.dtype == dtype and out.shape == expected.shape
    # Inputs and weights rounded to 8 (bf16) / 11 (fp16) mantissa bits: per-element errors of ~2^-9 that
    # average over 27*C products, so 2 % of the output's max is far above rounding and far below the
    # upstream bug (rel ~1.7 or NaN).
    assert rel_err(out.float(), expected) <= 0.02


def test_fp32_route_only_for_cpu_low_precision_strided_convs():
    strided, plain = torch.nn.Conv3d(4, 4, 3, stride=2), torch.nn.Conv3d(4, 4, 3)
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    assert needs_fp32_strided_conv(bf16, strided)
    assert needs_fp32_strided_conv(bf16.half(), strided)
    assert not needs_fp32_strided_conv(fp32, strided)
    assert not needs_fp32_strided_conv(bf16, plain)
    assert not needs_fp32_strided_conv(torch.zeros(1, dtype=torch.bfloat16, device="meta"), strided)


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------


def test_block_causal_attention_matches_masked_sdpa():
    T, n, D = 3, 5, 16
    q, k, v = (torch.randn(2, T * n, D) for _ in range(3))
    mask = prepare_causal_attention_mask(T, n, dtype=torch.float32, batch_size=2)
    # The original's loop: row i sees columns < (i // n + 1) * n.
    loop_mask = torch.full((T * n, T * n), float("-inf"))
    for i in range(T * n):
        loop_mask[i, : (i // n + 1) * n] = 0
    assert torch.equal(mask[1], loop_mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert rel_err(block_causal_attention(q, k, v, T), expected) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad", [None, (1, 1, 1, 1, 2, 0), (2, 0, 1, 3, 1, 2)])
@torch.no_grad()
def test_groupnorm_fused_with_silu_and_padding_matches_unfused(dtype, pad):
    norm = GroupNorm32(8, 32, eps=1e-6)
    norm.weight.normal_(1.0, 0.3)
    norm.bias.normal_(0.0, 0.3)
    x = (3 * torch.randn(2, 32, 3, 5, 6) + 1).to(dtype)
    # The original under fp16/bf16 autocast: GroupNorm and SiLU in fp32, cast back by the next conv.
    expected = F.silu(F.group_norm(x.float(), 8, norm.weight, norm.bias, 1e-6)).to(dtype)
    if pad is not None:
        expected = F.pad(expected, pad, mode="replicate")
    out = norm(x, silu=True, pad=pad)
    assert out.dtype == dtype
    assert torch.equal(out, expected)  # normalising a few groups at a time changes no statistic
    if dtype == torch.float32:  # no SiLU: plain nn.GroupNorm
        plain = F.group_norm(x, 8, norm.weight, norm.bias, 1e-6)
        assert rel_err(norm(x), plain) <= 1e-6


def test_upsample_first_frame_separately_matches_interpolate():
    x = torch.randn(2, 3, 4, 5, 6)
    out = upsample_nearest_first_frame_separately(x, (2, 2, 2))
    first = F.interpolate(x[:, :, 0], scale_factor=(2, 2), mode="nearest").unsqueeze(2)
    rest = F.interpolate(x[:, :, 1:], scale_factor=(2, 2, 2), mode="nearest")
    assert out.shape == (2, 3, 7, 10, 12)
    assert torch.equal(out, torch.cat([first, rest], dim=2))
    assert upsample_nearest_first_frame_separately(x[:, :, :1], (1, 2, 2)).shape == (2, 3, 1, 10, 12)
    pad = (1, 1, 1, 1, 2, 0)
    padded = upsample_nearest_first_frame_separately(x, (2, 2, 2), pad)
    assert torch.equal(padded, F.pad(out, pad, mode="replicate"))


# ---------------------------------------------------------------------------------------------------------
# Full-size architecture, config and loading
# ---------------------------------------------------------------------------------------------------------


def test_full_size_state_dict_matches_official_manifest():
    with torch.device("meta"):
        model = AutoencoderKLCausal3D(VAEConfig.from_dict(OFFICIAL_CONFIG_JSON))
    manifest = {}
    for line in MANIFEST.read_text().splitlines():
        key, shape = line.split("\t")
        manifest[key] = tuple(json.loads(shape))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest
    assert len(ours) == 248
    assert sum(p.numel() for p in model.parameters()) == 246_478_803


def test_config_from_json_and_validation():
    assert VAEConfig.from_dict(OFFICIAL_CONFIG_JSON) == VAEConfig()
    diffusers_style = {
        "temporal_compression_ratio": 4,
        "down_block_types": ["HunyuanVideoDownBlock3D"] * 4,
        "up_block_types": ["HunyuanVideoUpBlock3D"] * 4,
        "force_upcast": True,
    }
    assert VAEConfig.from_dict(diffusers_style) == VAEConfig()
    with pytest.raises(ValueError, match="time_compression_ratio 8"):
        VAEConfig.from_dict({**OFFICIAL_CONFIG_JSON, "time_compression_ratio": 8})
    with pytest.raises(ValueError, match="unknown block types"):
        VAEConfig.from_dict({**OFFICIAL_CONFIG_JSON, "down_block_types": ["DownBlock3D"] * 4})
    with pytest.raises(ValueError, match="spatial_compression_ratio 16"):
        VAEConfig(spatial_compression_ratio=16)


def _write_vae_dir(path: Path, config: VAEConfig, state: dict, name: str = "pytorch_model.pt") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    raw = dict(OFFICIAL_CONFIG_JSON)
    raw.update(
        block_out_channels=list(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        latent_channels=config.latent_channels,
        sample_size=config.sample_size,
        sample_tsize=config.sample_tsize,
    )
    (path / "config.json").write_text(json.dumps(raw))
    if name.endswith(".safetensors"):
        save_file(state, str(path / name))
    else:
        torch.save(state, path / name)
    return path


@torch.no_grad()
def test_load_vae_unwraps_state_dict_and_vae_prefix(tmp_path):
    source = _tiny_model(seed=3)
    wrapped = {"state_dict": {f"vae.{k}": v for k, v in source.state_dict().items()}}
    wrapped["state_dict"]["loss.discriminator.weight"] = torch.zeros(1)  # non-VAE entries are dropped
    vae_dir = _write_vae_dir(tmp_path / "vae", TINY, wrapped)
    model = load_vae(vae_dir, dtype=torch.float32, device="cpu")
    assert model.config == TINY and not model.training
    assert model.use_spatial_tiling and model.use_temporal_tiling
    assert all(not p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    z = torch.randn(1, TINY.latent_channels, 2, 3, 3)
    assert torch.equal(model.decode(z), source.decode(z))
    half = load_vae(vae_dir, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_load_vae_accepts_safetensors(tmp_path):
    source = _tiny_model(seed=4)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    vae_dir = _write_vae_dir(tmp_path / "vae", TINY, state, name="diffusion_pytorch_model.safetensors")
    model = load_vae(vae_dir, dtype=torch.float32, device="cpu")
    assert torch.equal(model.quant_conv.weight, source.quant_conv.weight)


def test_load_vae_reports_mismatched_keys(tmp_path):
    state = dict(_tiny_model().state_dict())
    state.pop("decoder.conv_out.conv.bias")
    state["decoder.extra.weight"] = torch.zeros(2)
    state["quant_conv.weight"] = torch.zeros(3, 3, 1, 1, 1)
    vae_dir = _write_vae_dir(tmp_path / "vae", TINY, state)
    with pytest.raises(ValueError) as err:
        load_vae(vae_dir, dtype=torch.float32, device="cpu")
    msg = str(err.value)
    assert "1 missing, 1 unexpected, 1 with a different shape" in msg
    assert "decoder.conv_out.conv.bias" in msg and "decoder.extra.weight" in msg and "quant_conv" in msg


def test_load_vae_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vae(tmp_path / "nowhere", dtype=torch.float32, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path / "empty", dtype=torch.float32, device="cpu")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(OFFICIAL_CONFIG_JSON))
    with pytest.raises(FileNotFoundError, match="pytorch_model.pt"):
        load_vae(tmp_path / "empty", dtype=torch.float32, device="cpu")
