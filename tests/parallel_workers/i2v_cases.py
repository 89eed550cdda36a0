"""Shared I2V cases of tests/test_i2v_parallel.py and its torchrun worker (the same seeds on both sides)."""

from __future__ import annotations

import torch

from hyvideo.diffusion import FlowMatchDiscreteScheduler
from hyvideo.diffusion.pipelines import HunyuanVideoPipeline, TextConditions
from hyvideo.i2v.conditioning import ImageCondition
from hyvideo.modules import HYVideoDiffusionTransformer
from hyvideo.testing.tiny import TINY_DIT, randomize_

CONFIG = TINY_DIT.with_updates(image_condition_type="token_replace")
LATENT = (2, 6, 10)  # latent frames, height, width: 2 frames of 3 x 5 = 15 tokens


def build_dit() -> HYVideoDiffusionTransformer:
    dit = HYVideoDiffusionTransformer(CONFIG, dtype=torch.float32, attention_backend="sdpa").eval()
    randomize_(dit, generator=torch.Generator().manual_seed(0))
    return dit


def dit_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    return {
        "x": torch.randn(2, 16, *LATENT, generator=g),
        "t": torch.tensor([700.0, 300.0]),
        "text_states": torch.randn(2, 7, CONFIG.text_states_dim, generator=g),
        "text_mask": mask,
        "text_states_2": torch.randn(2, CONFIG.text_states_dim_2, generator=g),
        "guidance": torch.tensor([6000.0, 6000.0]),
    }


def build_pipeline(dit, parallel=None) -> HunyuanVideoPipeline:
    return HunyuanVideoPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        transformer=dit,
        scheduler=FlowMatchDiscreteScheduler(shift=17.0),
        dit_dtype=torch.float32,
        vae_dtype=torch.float32,
        use_autocast=False,
        parallel=parallel,
    )


def run_pipeline(pipe):
    g = torch.Generator().manual_seed(2)
    cond = TextConditions(
        torch.randn(1, 7, CONFIG.text_states_dim, generator=g),
        torch.ones(1, 7, dtype=torch.long),
        torch.randn(1, CONFIG.text_states_dim_2, generator=g),
    )
    image = torch.randn(1, 16, 1, *LATENT[1:], generator=g)
    return pipe(
        prompt_conditions=cond,
        height=LATENT[1] * 8,
        width=LATENT[2] * 8,
        video_length=5,
        num_inference_steps=2,
        embedded_guidance_scale=6.0,
        generator=[torch.Generator().manual_seed(3)],
        output_type="latent",
        show_progress=False,
        image_condition=ImageCondition(image, stability=True),
    )
