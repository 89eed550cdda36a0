"""The HunyuanVideo DiT and its checkpoint loading."""

# The `attention()` function is not re-exported: it would shadow the `attention` submodule.
from .attention import (
    available_attention_backends,
    register_attention_backend,
    resolve_attention_backend,
)
from .loading import (
    build_dit,
    check_dit_state_dict,
    convert_diffusers_to_official,
    convert_official_to_diffusers,
    load_dit,
    load_dit_state_dict,
    load_dit_weights,
)
from .models import HIGH_PRECISION_MODULES, HYVideoDiffusionTransformer
from .posemb_layers import get_rotary_pos_embed

__all__ = [
    "HIGH_PRECISION_MODULES",
    "HYVideoDiffusionTransformer",
    "available_attention_backends",
    "build_dit",
    "check_dit_state_dict",
    "convert_diffusers_to_official",
    "convert_official_to_diffusers",
    "get_rotary_pos_embed",
    "load_dit",
    "load_dit_state_dict",
    "load_dit_weights",
    "register_attention_backend",
    "resolve_attention_backend",
]
