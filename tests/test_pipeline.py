"""The pipeline equals diffusers' HunyuanVideoPipeline given identical components, embeddings and noise."""

from __future__ import annotations

import pytest
import torch

from hyvideo.diffusion import FlowMatchDiscreteScheduler
from hyvideo.diffusion.pipelines import HunyuanVideoPipeline, TextConditions
from hyvideo.diffusion.pipelines.pipeline_hunyuan_video import (
    classifier_free_guidance,
    embedded_guidance_tensor,
)
from hyvideo.modules import HYVideoDiffusionTransformer
from hyvideo.testing.peers import diffusers_transformer
from hyvideo.testing.tiny import TINY_DIT, TINY_VAE, randomize_
from hyvideo.vae import AutoencoderKLCausal3D, VAEConfig
from tests.helpers import rel_err

HEIGHT, WIDTH, FRAMES, STEPS = 32, 48, 5, 3


@pytest.fixture(scope="module")
def components():
    gen = torch.Generator().manual_seed(0)
    dit = HYVideoDiffusionTransformer(TINY_DIT, dtype=torch.float32, attention_backend="sdpa").eval()
    randomize_(dit, generator=gen)
    vae = AutoencoderKLCausal3D(VAEConfig.from_dict(TINY_VAE)).eval()
    randomize_(vae, generator=gen, std=0.1)
    return dit, vae


@pytest.fixture(scope="module")
def diffusers_pipe(components):
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
    from diffusers import HunyuanVideoPipeline as DiffusersPipeline

    dit, vae = components
    twin = diffusers_transformer(dit.config, dit.state_dict())
    vae_twin = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=tuple(TINY_VAE["block_out_channels"]),
        layers_per_block=TINY_VAE["layers_per_block"], norm_num_groups=TINY_VAE["norm_num_groups"],
        scaling_factor=TINY_VAE["scaling_factor"],
    ).eval()
    vae_twin.load_state_dict(vae.state_dict(), strict=True)
    return DiffusersPipeline(text_encoder=None, tokenizer=None, transformer=twin, vae=vae_twin,
                             scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                             tokenizer_2=None)


def conditions(batch: int, valid: tuple[int, ...], seed: int = 1) -> TextConditions:
    gen = torch.Generator().manual_seed(seed)
    length = max(valid)
    mask = torch.stack([torch.arange(length) < n for n in valid]).long()
    embeds = torch.randn(batch, length, TINY_DIT.text_states_dim, generator=gen)
    pooled = torch.randn(batch, TINY_DIT.text_states_dim_2, generator=gen)
    return TextConditions(embeds, mask, pooled)


def our_pipeline(components) -> HunyuanVideoPipeline:
    dit, vae = components
    return HunyuanVideoPipeline(vae=vae, text_encoder=None, text_encoder_2=None, transformer=dit,
                                scheduler=FlowMatchDiscreteScheduler(shift=7.0), dit_dtype=torch.float32,
                                vae_dtype=torch.float32, use_autocast=False)


@pytest.mark.parametrize("valid", [(9,), (9, 5)], ids=["b1", "b2-padded"])
def test_latents_and_video_equal_diffusers(components, diffusers_pipe, valid):
    cond = conditions(len(valid), valid)
    noise = torch.randn(len(valid), 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8,
                        generator=torch.Generator().manual_seed(2))
    ours = our_pipeline(components)(
        prompt_conditions=cond, height=HEIGHT, width=WIDTH, video_length=FRAMES, num_inference_steps=STEPS,
        embedded_guidance_scale=6.0, latents=noise.clone(), enable_tiling=False, show_progress=False,
    )
    diffusers_pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled,
                  prompt_attention_mask=cond.mask, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                  num_inference_steps=STEPS, guidance_scale=6.0, latents=noise.clone())
    ref_latents = diffusers_pipe(**kwargs, output_type="latent").frames
    assert rel_err(ours.latents, ref_latents) <= 1e-5
    ref_video = diffusers_pipe(**kwargs, output_type="pt").frames  # (B, T, C, H, W) in [0, 1]
    assert ours.videos.shape == (len(valid), 3, FRAMES, HEIGHT, WIDTH)
    assert rel_err(ours.videos, ref_video.permute(0, 2, 1, 3, 4)) <= 1e-5


def test_callback_latent_output_and_cfg(components):
    pipe = our_pipeline(components)
    seen = []
    out = pipe(prompt_conditions=conditions(1, (7,)), negative_conditions=conditions(1, (4,), seed=9),
               guidance_scale=3.0, height=HEIGHT, width=WIDTH, video_length=FRAMES, num_inference_steps=2,
               latents=torch.randn(1, 16, 2, 4, 6), output_type="latent",
               callback_on_step_end=lambda i, t, x: seen.append((i, float(t), x.dtype)), show_progress=False)
    assert out.videos is None and out.latents.dtype == torch.float32
    assert [s[0] for s in seen] == [0, 1] and seen[0][1] == 1000.0


def test_cfg_batches_negative_first(components):
    """With CFG the DiT sees [negative, positive] and the result is u + s (c - u)."""
    dit, _ = components
    pipe = our_pipeline(components)
    pos, neg = conditions(1, (7,)), conditions(1, (4,), seed=9)
    latents, t = torch.randn(1, 16, 2, 4, 6), torch.tensor(900.0)
    guidance = embedded_guidance_tensor(6.0, 1, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        v_u = dit(latents, t[None], neg.embeds, neg.mask, neg.pooled, guidance)
        v_c = dit(latents, t[None], pos.embeds, pos.mask, pos.pooled, guidance)
        got = pipe.predict_velocity(latents, t, TextConditions.cat(neg, pos), guidance_scale=4.0,
                                    embedded_guidance_scale=6.0)
    assert rel_err(got, classifier_free_guidance(v_u, v_c, 4.0)) <= 1e-5


def test_embedded_guidance_rounds_like_the_original():
    values = {6.0: 6016.0, 1.0: 1000.0, 3.5: 3504.0, 7.5: 7488.0, 10.0: 9984.0}
    for scale, expected in values.items():
        got = embedded_guidance_tensor(scale, 2, dtype=torch.bfloat16, device="cpu")
        assert got.tolist() == [expected, expected]
    assert embedded_guidance_tensor(6.0, 1, dtype=torch.float32, device="cpu").item() == 6000.0


def test_negative_prompt_default():
    from hyvideo.constants import NEGATIVE_PROMPT

    assert HunyuanVideoPipeline.resolve_negative_prompt(None) == NEGATIVE_PROMPT
    assert HunyuanVideoPipeline.resolve_negative_prompt("  ") == NEGATIVE_PROMPT
    assert HunyuanVideoPipeline.resolve_negative_prompt(" blurry ") == "blurry"


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=30, width=48, video_length=5), "multiples of 16"),
    (dict(height=32, width=48, video_length=6), r"4k\+1"),
])
def test_check_inputs(components, kwargs, message):
    with pytest.raises(ValueError, match=message):
        our_pipeline(components)(prompt_conditions=conditions(1, (3,)), **kwargs)
