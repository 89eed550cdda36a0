"""HunyuanVideo's causal 3-D VAE ("884-16c-hy"): 4x time, 8x space, 16 latent channels."""

from hyvideo.vae.autoencoder_kl_causal_3d import AutoencoderKLCausal3D, VAEConfig, load_vae
from hyvideo.vae.tiling import Tile, TileGeometry, TilePlan
from hyvideo.vae.vae import DiagonalGaussianDistribution

__all__ = [
    "AutoencoderKLCausal3D",
    "DiagonalGaussianDistribution",
    "Tile",
    "TileGeometry",
    "TilePlan",
    "VAEConfig",
    "load_vae",
]
