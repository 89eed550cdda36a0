"""I2V sampling: frame 0 held bit-exact (token replace), latent-concat channel order, stability mix."""

from __future__ import annotations

import pytest
import torch

from hyvideo.diffusion import FlowMatchDiscreteScheduler
from hyvideo.diffusion.pipelines import HunyuanVideoPipeline, TextConditions
from hyvideo.i2v.conditioning import ImageCondition, concat_condition, encode_image_latents, stability_mix
from hyvideo.modules import HYVideoDiffusionTransformer
from hyvideo.testing.tiny import TINY_DIT, TINY_VAE, randomize_
from hyvideo.vae import AutoencoderKLCausal3D, VAEConfig
from tests.helpers import rel_err

HEIGHT, WIDTH, FRAMES, STEPS = 32, 48, 9, 3  # 3 latent frames


def dit(config):
    model = HYVideoDiffusionTransformer(config, dtype=torch.float32, attention_backend="sdpa").eval()
    randomize_(model, generator=torch.Generator().manual_seed(0))
    return model


def pipeline(model, vae=None):
    return HunyuanVideoPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=None,
        transformer=model,
        scheduler=FlowMatchDiscreteScheduler(shift=17.0),
        dit_dtype=torch.float32,
        vae_dtype=torch.float32,
        use_autocast=False,
    )


def conditions(batch: int = 1) -> TextConditions:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 9, dtype=torch.long)
    return TextConditions(
        torch.randn(batch, 9, TINY_DIT.text_states_dim, generator=gen),
        mask,
        torch.randn(batch, TINY_DIT.text_states_dim_2, generator=gen),
    )


def image_latents(batch: int = 1):
    return torch.randn(batch, 16, 1, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(3))


def test_token_replace_holds_frame_0_bit_exact_and_steps_the_rest():
    model = dit(TINY_DIT.with_updates(image_condition_type="token_replace"))
    image = image_latents()
    seen_inputs, seen_latents = [], []
    original_forward = model.forward

    def spy(x, *args, **kwargs):
        seen_inputs.append(x.clone())
        return original_forward(x, *args, **kwargs)

    model.forward = spy
    out = pipeline(model)(
        prompt_conditions=conditions(),
        height=HEIGHT,
        width=WIDTH,
        video_length=FRAMES,
        num_inference_steps=STEPS,
        embedded_guidance_scale=6.0,
        generator=[torch.Generator().manual_seed(5)],
        output_type="latent",
        show_progress=False,
        image_condition=ImageCondition(image, "token_replace"),
        callback_on_step_end=lambda i, t, x: seen_latents.append(x.clone()),
    )
    assert len(seen_inputs) == STEPS and out.latents.shape == (1, 16, 3, 4, 6)
    for x in seen_inputs:  # the DiT always sees the image as frame 0, also at the first (noise) step
        assert torch.equal(x[:, :, :1], image)
    for x in seen_latents:
        assert torch.equal(x[:, :, :1], image)
    assert torch.equal(out.latents[:, :, :1], image)
    # frames 1.. start from the same noise draw as T2V and move
    noise = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(out.latents[:, :, 1:], noise[:, :, 1:])


def test_token_replace_step_equals_stepping_frames_1_on_alone():
    scheduler = FlowMatchDiscreteScheduler(shift=17.0)
    scheduler.set_timesteps(4)
    reference = FlowMatchDiscreteScheduler(shift=17.0)
    reference.set_timesteps(4)
    latents, v, image = torch.randn(1, 16, 3, 2, 2), torch.randn(1, 16, 3, 2, 2), torch.randn(1, 16, 1, 2, 2)
    t = scheduler.timesteps[0]
    out = ImageCondition(image).step(scheduler, v, t, latents)
    assert torch.equal(out[:, :, 1:], reference.step(v[:, :, 1:], t, latents[:, :, 1:]))
    assert torch.equal(out[:, :, :1], image)


def test_latent_concat_channel_order():
    image = image_latents()
    latents = torch.randn(1, 16, 3, 4, 6)
    x = ImageCondition(image, "latent_concat").model_input(latents)
    assert x.shape == (1, 33, 3, 4, 6)
    assert torch.equal(x[:, :16], latents)  # 1. the noisy latents
    assert torch.equal(x[:, 16:32, :1], image) and not x[:, 16:32, 1:].any()  # 2. image on frame 0 only
    assert x[:, 32:, 0].eq(1).all() and not x[:, 32:, 1:].any()  # 3. the mask
    cond, mask = concat_condition(image, 3)
    assert cond.shape == (1, 16, 3, 4, 6) and mask.shape == (1, 1, 3, 4, 6)


def test_latent_concat_pipeline_runs_the_33_channel_dit():
    model = dit(
        TINY_DIT.with_updates(in_channels=33, guidance_embed=False, image_condition_type="latent_concat")
    )
    out = pipeline(model)(
        prompt_conditions=conditions(),
        height=HEIGHT,
        width=WIDTH,
        video_length=FRAMES,
        num_inference_steps=2,
        embedded_guidance_scale=None,
        generator=[torch.Generator().manual_seed(5)],
        output_type="latent",
        show_progress=False,
        image_condition=ImageCondition(image_latents(), "latent_concat"),
    )
    assert out.latents.shape == (1, 16, 3, 4, 6)


def test_stability_mix_is_float32_and_cast_back():
    noise = torch.randn(1, 16, 3, 2, 2).half()
    image = torch.randn(1, 16, 1, 2, 2).half()
    mixed = stability_mix(noise, image)
    t = torch.tensor([0.999])
    expected = (noise.float() * t + image.float().expand(1, 16, 3, 2, 2) * (1 - t)).half()
    assert mixed.dtype == torch.float16 and torch.equal(mixed, expected)
    # off: the noise itself; latent_concat always mixes (as the first release)
    assert torch.equal(ImageCondition(image).initial_latents(noise), noise)
    assert torch.equal(ImageCondition(image, stability=True).initial_latents(noise), mixed)
    assert torch.equal(ImageCondition(image, "latent_concat").initial_latents(noise), mixed)


def test_image_latents_are_the_untiled_scaled_mean():
    vae = AutoencoderKLCausal3D(VAEConfig.from_dict(TINY_VAE)).eval()
    randomize_(vae, generator=torch.Generator().manual_seed(1), std=0.1)
    vae.enable_tiling()
    pixels = torch.rand(1, 3, 1, HEIGHT, WIDTH) * 2 - 1
    latents = encode_image_latents(vae, pixels, vae_dtype=torch.float32)
    with torch.no_grad():
        vae.disable_tiling()
        expected = vae.encode(pixels).mode() * TINY_VAE["scaling_factor"]
    assert torch.equal(latents, expected) and latents.shape == (1, 16, 1, 4, 6)


def test_bad_condition_type():
    with pytest.raises(ValueError, match="condition_type"):
        ImageCondition(image_latents(), "concat")


# ------------------------------------------------------------------------------------------------
# Parity with diffusers' HunyuanVideoImageToVideoPipeline (its DiT twin and sampler loop)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("condition_type", ["token_replace", "latent_concat"])
def test_sampler_loop_equals_diffusers_image_to_video(condition_type):
    """Same weights, embeddings, noise and image. Spec §6 differences matched by configuration: diffusers
    always applies the stability mix (we pass stability=True), runs latents in float32 (so do we here),
    stretches the image to (H, W) without bucketing (the image is given at exactly H x W, so the stretch and
    our resize + crop are both the identity), and encodes it untiled (tiling off on both sides). Not compared:
    prompt encoding (embeddings are given to both) and decoding (latent output)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoImageToVideoPipeline,
    )
    from PIL import Image

    from hyvideo.i2v import image_to_tensor
    from hyvideo.testing.peers import diffusers_transformer

    channels = 33 if condition_type == "latent_concat" else 16
    model = dit(TINY_DIT.with_updates(in_channels=channels, image_condition_type=condition_type))
    vae = AutoencoderKLCausal3D(VAEConfig.from_dict(TINY_VAE)).eval()
    randomize_(vae, generator=torch.Generator().manual_seed(1), std=0.1)
    vae_twin = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=tuple(TINY_VAE["block_out_channels"]),
        layers_per_block=TINY_VAE["layers_per_block"],
        norm_num_groups=TINY_VAE["norm_num_groups"],
        scaling_factor=TINY_VAE["scaling_factor"],
    ).eval()
    vae_twin.load_state_dict(vae.state_dict(), strict=True)
    theirs_pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=diffusers_transformer(model.config, model.state_dict()),
        vae=vae_twin,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=17.0),
        text_encoder_2=None,
        tokenizer_2=None,
        image_processor=None,
    )
    theirs_pipe.set_progress_bar_config(disable=True)

    pixels = torch.randint(0, 256, (HEIGHT, WIDTH, 3), generator=torch.Generator().manual_seed(4)).to(
        torch.uint8
    )
    image = Image.fromarray(pixels.numpy(), "RGB")
    cond = conditions()
    noise = torch.randn(1, 16, 3, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(5))
    latents_image = encode_image_latents(vae, image_to_tensor(image), vae_dtype=torch.float32)
    ours = pipeline(model, vae)(
        prompt_conditions=cond,
        height=HEIGHT,
        width=WIDTH,
        video_length=FRAMES,
        num_inference_steps=STEPS,
        embedded_guidance_scale=6.0 if model.config.guidance_embed else None,
        latents=noise.clone(),
        output_type="latent",
        show_progress=False,
        image_condition=ImageCondition(latents_image, condition_type, stability=True),
    )
    theirs = theirs_pipe(
        image=image,
        prompt_embeds=cond.embeds,
        pooled_prompt_embeds=cond.pooled,
        prompt_attention_mask=cond.mask,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=6.0,
        latents=noise.clone(),
        output_type="latent",
    ).frames
    if (
        condition_type == "latent_concat"
    ):  # diffusers' latent output drops latent frame 0 (its decode: 4 frames)
        theirs = torch.cat((ours.latents[:, :, :1], theirs), dim=2)
    # float32 throughout; the image normalisation ((x - 0.5) / 0.5 vs 2x - 1) may differ in the last bit
    assert rel_err(ours.latents, theirs) <= 1e-5
