"""Inputs shared by the sequence-parallel DiT / pipeline / VAE worker and its pytest side.

Everything is built from fixed seeds, so the torchrun worker (every rank) and the single-process reference in
tests/test_parallel_dit_pipeline.py construct the same weights and inputs. Sizes are picked so that the image
token counts do not divide by 2 or 4 (the padding path) and the VAE decode has several spatial and temporal
tiles.
"""

from __future__ import annotations

import torch

from hyvideo.constants import DiTConfig
from hyvideo.diffusion import FlowMatchDiscreteScheduler
from hyvideo.diffusion.pipelines import HunyuanVideoPipeline, TextConditions
from hyvideo.modules import HYVideoDiffusionTransformer
from hyvideo.testing.tiny import randomize_
from hyvideo.vae import AutoencoderKLCausal3D, VAEConfig

# 4 heads so that Ulysses 4 is possible (the tiny checkpoint tree's DiT has 2).
DIT4 = DiTConfig(
    hidden_size=64, heads_num=4, mlp_width_ratio=2.0, mm_double_blocks_depth=2, mm_single_blocks_depth=2,
    rope_dim_list=(4, 6, 6), guidance_embed=True, text_states_dim=32, text_states_dim_2=32, refiner_depth=1,
)
# Tiles of 32 px / 4 latents (stride 3) and 16 frames / 4 (+1) latents (stride 3).
VAE_SMALL_TILES = VAEConfig(
    block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4, latent_channels=16,
    sample_size=32, sample_tsize=16,
)
TEXT_LEN = 8

# name -> (latent (B, C, T, H, W), valid text tokens per sample or None for no mask)
DIT_CASES = {
    "odd_mixed_text": ((2, 16, 3, 6, 10), (5, 8)),  # 45 tokens; samples padded differently -> key mask
    "even_common_pad": ((2, 16, 2, 4, 8), (6, 6)),  # 16 tokens; padding common to the batch -> cropped
    "fewer_tokens_than_ranks": ((1, 16, 1, 2, 6), None),  # 3 tokens: a rank holds only padding at world 4
}
# name -> (latent shape, spatial tiling, temporal tiling)
VAE_CASES = {
    "spatial_temporal": ((1, 16, 5, 4, 5), True, True),  # 2 temporal x 2 x 2 = 8 tiles
    "spatial_only": ((1, 16, 3, 7, 5), True, True),  # T=3 <= 4: 3 x 2 spatial tiles
    "two_tiles": ((1, 16, 2, 5, 3), True, True),  # 2 tiles: fewer than ranks at world 4
    "untiled": ((1, 16, 5, 6, 10), False, False),  # tiling off: every rank decodes the whole
}
# The whole pipeline: 48 x 80 px, 17 frames -> latents (5, 6, 10), 75 image tokens, 16 VAE tiles; CFG with
# prompts of different lengths -> a batch of 2 with different text padding.
PIPE = dict(height=48, width=80, video_length=17, num_inference_steps=2, guidance_scale=2.5,
            embedded_guidance_scale=6.0)
PIPE_SEED = 11


def build_dit() -> HYVideoDiffusionTransformer:
    dit = HYVideoDiffusionTransformer(DIT4, dtype=torch.float32, attention_backend="sdpa").eval()
    randomize_(dit, generator=torch.Generator().manual_seed(0))
    return dit


def build_vae() -> AutoencoderKLCausal3D:
    vae = AutoencoderKLCausal3D(VAE_SMALL_TILES).eval()
    randomize_(vae, generator=torch.Generator().manual_seed(1), std=0.1)
    return vae


def text_conditions(valid: tuple[int, ...], seed: int, length: int = TEXT_LEN) -> TextConditions:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.stack([torch.arange(length) < n for n in valid]).long()
    embeds = torch.randn(len(valid), length, DIT4.text_states_dim, generator=gen)
    pooled = torch.randn(len(valid), DIT4.text_states_dim_2, generator=gen)
    return TextConditions(embeds, mask, pooled)


def dit_inputs(name: str) -> dict:
    """Keyword arguments of one DiT forward for case `name`."""
    shape, valid = DIT_CASES[name]
    gen = torch.Generator().manual_seed(100 + len(name))
    batch = shape[0]
    cond = text_conditions(valid or (TEXT_LEN,) * batch, seed=200 + len(name))
    return dict(
        x=torch.randn(shape, generator=gen),
        t=torch.tensor([900.0, 400.0][:batch]),
        text_states=cond.embeds,
        text_mask=cond.mask if valid is not None else None,
        text_states_2=cond.pooled,
        guidance=torch.full((batch,), 6000.0),
    )


def vae_latents(name: str) -> torch.Tensor:
    shape, _, _ = VAE_CASES[name]
    return torch.randn(shape, generator=torch.Generator().manual_seed(300 + len(name)))


def set_vae_tiling(vae: AutoencoderKLCausal3D, name: str) -> None:
    _, spatial, temporal = VAE_CASES[name]
    vae.enable_spatial_tiling(spatial)
    vae.enable_temporal_tiling(temporal)


def build_pipeline(dit, vae, parallel=None, cfg_parallel=None) -> HunyuanVideoPipeline:
    return HunyuanVideoPipeline(
        vae=vae, text_encoder=None, text_encoder_2=None, transformer=dit,
        scheduler=FlowMatchDiscreteScheduler(shift=7.0), dit_dtype=torch.float32, vae_dtype=torch.float32,
        use_autocast=False, parallel=parallel, cfg_parallel=cfg_parallel,
    )


def run_pipeline(pipe: HunyuanVideoPipeline, seed: int = PIPE_SEED, output_type: str = "pt"):
    """The CFG pipeline run: positive prompt of 7 tokens, negative of 4 (padded differently in the batch).

    output_type="latent" skips the VAE decode (most of the run's time on a CPU).
    """
    return pipe(
        prompt_conditions=text_conditions((7,), seed=21), negative_conditions=text_conditions((4,), seed=22),
        generator=[torch.Generator().manual_seed(seed)], enable_tiling=True, show_progress=False,
        output_type=output_type, **PIPE,
    )
