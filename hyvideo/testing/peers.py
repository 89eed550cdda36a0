"""diffusers' HunyuanVideo models built as twins of ours: the parity peer of the tests and benchmarks."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hyvideo.constants import DiTConfig


def diffusers_dit_config(config: DiTConfig) -> dict:
    """Our DiTConfig in the constructor arguments of diffusers' HunyuanVideoTransformer3DModel."""
    return dict(
        in_channels=config.in_channels, out_channels=config.out_channels, num_attention_heads=config.heads_num,
        attention_head_dim=config.head_dim, num_layers=config.mm_double_blocks_depth,
        num_single_layers=config.mm_single_blocks_depth, num_refiner_layers=config.refiner_depth,
        mlp_ratio=config.mlp_width_ratio, patch_size=config.patch_size[1], patch_size_t=config.patch_size[0],
        guidance_embeds=config.guidance_embed, text_embed_dim=config.text_states_dim,
        pooled_projection_dim=config.text_states_dim_2, rope_theta=config.rope_theta,
        rope_axes_dim=tuple(config.rope_dim_list),
        **({"image_condition_type": config.image_condition_type} if config.image_condition_type else {}),
    )


def diffusers_transformer(config: DiTConfig, state_dict: Mapping[str, torch.Tensor]):
    """diffusers' transformer holding `state_dict` (official keys), converted with our key mapping.

    Built on the meta device and assign-loaded, so a large twin does not exist twice in memory.
    """
    from diffusers import HunyuanVideoTransformer3DModel

    from hyvideo.modules import convert_official_to_diffusers

    with torch.device("meta"):
        twin = HunyuanVideoTransformer3DModel(**diffusers_dit_config(config))
    converted = convert_official_to_diffusers(state_dict, config.hidden_size)
    twin.load_state_dict(converted, strict=True, assign=True)
    return twin.eval()
