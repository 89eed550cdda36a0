"""The causal 3-D VAE "884-16c-hy": config, encode/decode with the original's tiling, and the loader.

The VAE itself does not scale latents: the pipeline divides by `config.scaling_factor` before `decode`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hyvideo.vae.tiling import Tile, TileBlender, TileGeometry, TilePlan, blend_tiles, plan_tiles
from hyvideo.vae.unet_causal_3d_blocks import DOWN_BLOCK_TYPE, UP_BLOCK_TYPE
from hyvideo.vae.vae import DecoderCausal3D, DiagonalGaussianDistribution, EncoderCausal3D

logger = logging.getLogger(__name__)

# Names used by diffusers' AutoencoderKLHunyuanVideo config.json, accepted as aliases.
_CONFIG_KEY_ALIASES = {"temporal_compression_ratio": "time_compression_ratio"}
_BLOCK_TYPE_ALIASES = {"HunyuanVideoDownBlock3D": DOWN_BLOCK_TYPE, "HunyuanVideoUpBlock3D": UP_BLOCK_TYPE}
WEIGHT_FILES = ("pytorch_model.pt", "pytorch_model.safetensors", "diffusion_pytorch_model.safetensors")


def _canonical_block_type(name: str) -> str:
    name = _BLOCK_TYPE_ALIASES.get(name, name)
    # Parity: the original's get_down_block3d / get_up_block3d strip an optional "UNetRes" prefix.
    return name.removeprefix("UNetRes")


@dataclass(frozen=True)
class VAEConfig:
    """Architecture and tiling defaults of `AutoencoderKLCausal3D`, named as in the official config.json."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    down_block_types: tuple[str, ...] = (DOWN_BLOCK_TYPE,) * 4
    up_block_types: tuple[str, ...] = (UP_BLOCK_TYPE,) * 4
    time_compression_ratio: int = 4
    spatial_compression_ratio: int = 8
    sample_size: int = 256
    sample_tsize: int = 64
    scaling_factor: float = 0.476986
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        # Normalise JSON lists and block-type aliases (allowed on a frozen dataclass via object.__setattr__).
        set_field = object.__setattr__
        set_field(self, "block_out_channels", tuple(self.block_out_channels))
        set_field(self, "down_block_types", tuple(map(_canonical_block_type, self.down_block_types)))
        set_field(self, "up_block_types", tuple(map(_canonical_block_type, self.up_block_types)))
        self._validate()

    def _validate(self) -> None:
        n = len(self.block_out_channels)
        if self.time_compression_ratio != 4:
            raise ValueError(
                f"time_compression_ratio {self.time_compression_ratio} is not supported: the causal VAE "
                "(like the original) only implements 4"
            )
        if n < 3:
            raise ValueError(f"block_out_channels needs at least 3 blocks for 4x time compression, got {n}")
        if self.spatial_compression_ratio != 2 ** (n - 1):
            raise ValueError(
                f"spatial_compression_ratio {self.spatial_compression_ratio} must equal 2 ** (len(block_out_"
                f"channels) - 1) = {2 ** (n - 1)}: the original derives tile sizes from the block count"
            )
        bad_down = sorted(set(self.down_block_types) - {DOWN_BLOCK_TYPE})
        bad_up = sorted(set(self.up_block_types) - {UP_BLOCK_TYPE})
        if bad_down or bad_up:
            raise ValueError(
                f"unknown block types down={bad_down} up={bad_up}; supported: {DOWN_BLOCK_TYPE!r} and "
                f"{UP_BLOCK_TYPE!r}"
            )
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}) and up_block_types "
                f"({len(self.up_block_types)}) must have one entry per block_out_channels entry ({n})"
            )
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn {self.act_fn!r} is not supported; the VAE uses 'silu'")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block_out_channels entry {self.block_out_channels} must be divisible by "
                f"norm_num_groups {self.norm_num_groups}"
            )
        if min(self.in_channels, self.out_channels, self.latent_channels, self.layers_per_block) < 1:
            raise ValueError("in/out/latent channels and layers_per_block must be positive")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> VAEConfig:
        """Build from a config.json dict; unknown keys (`_class_name`, `force_upcast`, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, ignored = {}, []
        for key, value in raw.items():
            name = _CONFIG_KEY_ALIASES.get(key, key)
            if name not in names:
                ignored.append(key)
                continue
            if name == "sample_size" and isinstance(value, (list, tuple)):
                value = value[0]  # Parity: the original uses sample_size[0] for list-valued sizes.
            kwargs[name] = tuple(value) if isinstance(value, list) else value
        if ignored:
            logger.debug("VAE config: ignoring keys %s", sorted(ignored))
        return cls(**kwargs)

    def tile_geometry(self) -> TileGeometry:
        """The original's default tiles: sample_size px, sample_tsize frames, overlap 0.25."""
        return TileGeometry(
            sample_size=self.sample_size,
            sample_tsize=self.sample_tsize,
            spatial_ratio=2 ** (len(self.block_out_channels) - 1),
            time_ratio=self.time_compression_ratio,
        )


class AutoencoderKLCausal3D(nn.Module):
    """HunyuanVideo's causal 3-D VAE: 4x time, 8x space compression, with the original's tiling (on)."""

    def __init__(self, config: VAEConfig | None = None, *, tile_geometry: TileGeometry | None = None) -> None:
        super().__init__()
        config = config or VAEConfig()
        self.config = config
        arch = dict(
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            spatial_compression_ratio=config.spatial_compression_ratio,
            time_compression_ratio=config.time_compression_ratio,
            mid_block_add_attention=config.mid_block_add_attention,
        )
        self.encoder = EncoderCausal3D(config.in_channels, config.latent_channels, **arch)
        self.decoder = DecoderCausal3D(config.latent_channels, config.out_channels, **arch)
        self.quant_conv = nn.Conv3d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(config.latent_channels, config.latent_channels, 1)
        self.tile_geometry = tile_geometry or config.tile_geometry()
        # Tiling is on by default: the original pipeline always calls enable_tiling().
        self.use_spatial_tiling = True
        self.use_temporal_tiling = True

    # ---------------------------------------------------------------------------------------------------
    # Properties and tiling switches
    # ---------------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def spatial_compression_ratio(self) -> int:
        return self.config.spatial_compression_ratio

    @property
    def time_compression_ratio(self) -> int:
        return self.config.time_compression_ratio

    def enable_tiling(self, geometry: TileGeometry | None = None) -> None:
        """Turn on spatial and temporal tiling, optionally with a new tile geometry."""
        if geometry is not None:
            self.tile_geometry = geometry
        self.use_spatial_tiling = self.use_temporal_tiling = True

    def disable_tiling(self) -> None:
        self.use_spatial_tiling = self.use_temporal_tiling = False

    def enable_spatial_tiling(self, enabled: bool = True) -> None:
        self.use_spatial_tiling = enabled

    def disable_spatial_tiling(self) -> None:
        self.use_spatial_tiling = False

    def enable_temporal_tiling(self, enabled: bool = True) -> None:
        self.use_temporal_tiling = enabled

    def disable_temporal_tiling(self) -> None:
        self.use_temporal_tiling = False

    # ---------------------------------------------------------------------------------------------------
    # Encode
    # ---------------------------------------------------------------------------------------------------

    def plan_encode_tiles(self, sample_shape: tuple[int, ...]) -> TilePlan:
        """Tiles for encoding a video of shape (..., T, H, W) under the current tiling switches."""
        g = self.tile_geometry
        return self._plan(sample_shape, g.sample_tsize, g.sample_size, g.encode_temporal, g.encode_spatial)

    def encode_tile(self, x: torch.Tensor, tile: Tile) -> torch.Tensor:
        """Moments (B, 2*C_lat, t, h, w) of one tile of the video x (B, C, T, H, W)."""
        # Parity: the original feeds fp32 inputs to fp16 weights under autocast, i.e. cast on entry.
        x = x[(slice(None), slice(None), *tile.region)].to(self.dtype)
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Encode a video or image batch into the latent posterior.

        Args:
            x: (B, C_in, T, H, W) with T = 1 or 4k + 1, values in [-1, 1].
        Returns:
            Posterior over latents (B, C_lat, (T - 1) / 4 + 1, H / 8, W / 8); use `.mode()` or `.sample()`.
        """
        self._check_input(x, self.config.in_channels, "video")
        T = x.shape[2]
        ratio = self.time_compression_ratio
        if T != 1 and (T - 1) % ratio != 0:
            raise ValueError(
                f"the causal VAE encodes 1 or {ratio}k+1 frames (1, {ratio + 1}, {2 * ratio + 1}, ..., 129); "
                f"got {T}. Trim or pad the video to {ratio * ((T - 1) // ratio) + 1} frames."
            )
        plan = self.plan_encode_tiles(x.shape)
        blender = TileBlender(plan)
        for tile in plan.tiles:
            blender.push(self.encode_tile(x, tile))
        return DiagonalGaussianDistribution(blender.result())

    # ---------------------------------------------------------------------------------------------------
    # Decode
    # ---------------------------------------------------------------------------------------------------

    def plan_decode_tiles(self, latent_shape: tuple[int, ...]) -> TilePlan:
        """Tiles for decoding latents of shape (..., T, h, w) under the current tiling switches.

        Ranks may decode disjoint subsets with `decode_tile` and gather them for `blend_decoded_tiles`.
        """
        g = self.tile_geometry
        return self._plan(latent_shape, g.latent_tsize, g.latent_size, g.decode_temporal, g.decode_spatial)

    def _plan(self, shape: tuple[int, ...], tsize: int, size: int, temporal_rule, spatial_rule) -> TilePlan:
        """Tile along time when T > tsize and in space when H or W > size (the original's triggers)."""
        T, H, W = shape[-3:]
        temporal = self.use_temporal_tiling and T > tsize
        spatial = self.use_spatial_tiling and (H > size or W > size)
        return plan_tiles(
            (T, H, W),
            temporal=temporal_rule if temporal else None,
            spatial=(spatial_rule, spatial_rule) if spatial else None,
        )

    def decode_tile(self, z: torch.Tensor, tile: Tile) -> torch.Tensor:
        """Decoded frames (B, C_out, t', h', w') of one tile of the latents z (B, C_lat, T, h, w)."""
        # Parity: the original feeds fp32 latents to fp16 weights under autocast, i.e. cast on entry.
        z = z[(slice(None), slice(None), *tile.region)].to(self.dtype)
        return self.decoder(self.post_quant_conv(z))

    @staticmethod
    def blend_decoded_tiles(tiles: list[torch.Tensor], plan: TilePlan) -> torch.Tensor:
        """Blend decoded tiles, given in `plan.tiles` order, into the video (the original's tiled result)."""
        return blend_tiles(tiles, plan)

    @staticmethod
    def blend_encoded_tiles(tiles: list[torch.Tensor], plan: TilePlan) -> torch.Tensor:
        """Blend encoded tile moments, given in `plan.tiles` order, into the full moments."""
        return blend_tiles(tiles, plan)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode (unscaled) latents into a video.

        Args:
            z: (B, C_lat, T, h, w) latents already divided by `scaling_factor`.
        Returns:
            (B, C_out, 4 * (T - 1) + 1, 8h, 8w), roughly in [-1, 1].
        """
        self._check_input(z, self.config.latent_channels, "latent")
        plan = self.plan_decode_tiles(z.shape)
        blender = TileBlender(plan)
        for tile in plan.tiles:
            # Streaming keeps one row of tile edges in memory instead of every decoded tile.
            blender.push(self.decode_tile(z, tile))
        return blender.result()

    def forward(
        self,
        sample: torch.Tensor,
        *,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Encode then decode (not used by T2V inference). sample: (B, C_in, T, H, W) -> same shape."""
        posterior = self.encode(sample)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    @staticmethod
    def _check_input(x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(
                f"expected a 5-D {what} tensor (B, {channels}, T, H, W); got shape {tuple(x.shape)}"
            )


# -------------------------------------------------------------------------------------------------------
# Loading
# -------------------------------------------------------------------------------------------------------


def _find_weights(vae_dir: Path) -> Path:
    for name in WEIGHT_FILES:
        if (vae_dir / name).is_file():
            return vae_dir / name
    raise FileNotFoundError(f"no VAE weights in {vae_dir}: expected one of {', '.join(WEIGHT_FILES)}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Flat state dict from the file, unwrapping the original's optional "state_dict" / "vae." layers."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ckpt: Any = load_file(str(path), device="cpu")
        else:
            # mmap needs the zip format that torch.save writes by default; legacy files are read normally.
            mmap = zipfile.is_zipfile(path)
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # a damaged file fails in many ways (RuntimeError, UnpicklingError, EOFError..)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not read the VAE weights {path} ({type(err).__name__}: {first}); the file "
                         "is damaged or incomplete: download it again (see ckpts/README.md)") from err
    if isinstance(ckpt, Mapping) and "state_dict" in ckpt:
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(ckpt).__name__})")
    if any(k.startswith("vae.") for k in ckpt):
        # Parity: the original keeps only the "vae."-prefixed keys and strips the prefix.
        ckpt = {k.removeprefix("vae."): v for k, v in ckpt.items() if k.startswith("vae.")}
    return dict(ckpt)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ValueError unless `state` has exactly the model's keys with the model's shapes."""
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"VAE weights {source} hold non-tensor entries: {not_tensors[:5]}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in sorted(expected.keys() & state.keys())
        if tuple(state[k].shape) != expected[k]
    ]
    if not (missing or unexpected or mismatched):
        return
    raise ValueError(
        f"VAE weights {source} do not match the architecture from config.json: {len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(mismatched)} with a different shape "
        f"(checkpoint has {len(state)} tensors, model expects {len(expected)}). "
        f"First missing: {missing[:5]}; first unexpected: {unexpected[:5]}; "
        f"first mismatched: {mismatched[:5]}. Check that config.json and the weights come from the same VAE."
    )


def load_vae(
    vae_dir: str | os.PathLike,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> AutoencoderKLCausal3D:
    """Load the VAE from a folder holding `config.json` and `pytorch_model.pt` (or a .safetensors file).

    The model is built on the meta device and the checked weights are assigned in one step, so a
    mismatching checkpoint raises before anything is loaded. Returns the model in eval mode, no grads,
    tiling on.
    """
    vae_dir = Path(vae_dir)
    if not vae_dir.is_dir():
        raise FileNotFoundError(
            f"VAE folder not found: {vae_dir} (expected config.json and pytorch_model.pt)"
        )
    config_path = vae_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"VAE config not found: {config_path}")
    config = VAEConfig.from_dict(json.loads(config_path.read_text()))
    weights_path = _find_weights(vae_dir)
    state = _read_state_dict(weights_path)
    with torch.device("meta"):
        model = AutoencoderKLCausal3D(config)
    check_state_dict(model, state, str(weights_path))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    logger.info("loaded VAE from %s (%s, %s)", weights_path, dtype, device)
    return model.to(device)
