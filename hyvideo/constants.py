"""Constants shared by the whole package: dtypes, prompt templates, model presets.

Nothing here resolves a path, reads the environment or touches a device: importing this module has no
side effects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch

# --------------------------------------------------------------------------------------------------
# Precisions
# --------------------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "fp16", "bf16")
PRECISION_TO_TYPE: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}

# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

NEGATIVE_PROMPT = (
    "Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, "
    "bad teeth, bad eyes, bad limbs, distortion"
)

# Parity: verbatim from the original, including the missing spaces after "video." etc.
PROMPT_TEMPLATE_ENCODE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, size, "
    "texture, quantity, text, spatial relationships of the objects and background:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
PROMPT_TEMPLATE_ENCODE_VIDEO = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)


@dataclass(frozen=True)
class PromptTemplate:
    """A chat template for the LLM text encoder.

    `crop_start` is the number of tokens before the user text, counting the tokenizer's BOS; those
    positions are removed from the encoder output.
    """

    template: str
    crop_start: int


PROMPT_TEMPLATE: dict[str, PromptTemplate] = {
    "dit-llm-encode": PromptTemplate(PROMPT_TEMPLATE_ENCODE, crop_start=36),
    "dit-llm-encode-video": PromptTemplate(PROMPT_TEMPLATE_ENCODE_VIDEO, crop_start=95),
}

# --------------------------------------------------------------------------------------------------
# Names accepted by the CLI
# --------------------------------------------------------------------------------------------------

TEXT_ENCODERS = ("clipL", "llm")
# Only one VAE was released: 4x time, 8x8 space, 16 latent channels.
VAE_TYPES = ("884-16c-hy",)
VAE_LATENT_CHANNELS = {"884-16c-hy": 16}

# --------------------------------------------------------------------------------------------------
# DiT architecture presets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of `HYVideoDiffusionTransformer`.

    Field names follow the original constructor. `text_states_dim` / `text_states_dim_2` are the LLM
    hidden size and the CLIP pooled size; `refiner_depth` is fixed to 2 upstream and only varies in
    tiny test configs.
    """

    hidden_size: int = 3072
    heads_num: int = 24
    mlp_width_ratio: float = 4.0
    mlp_act_type: str = "gelu_tanh"
    mm_double_blocks_depth: int = 20
    mm_single_blocks_depth: int = 40
    rope_dim_list: tuple[int, ...] = (16, 56, 56)
    rope_theta: float = 256.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    qkv_bias: bool = True
    qk_norm: bool = True
    qk_norm_type: str = "rms"
    guidance_embed: bool = False
    text_states_dim: int = 4096
    text_states_dim_2: int = 768
    refiner_depth: int = 2
    # Image-to-video: None (T2V), "token_replace" (the tokens of latent frame 0 are modulated from t = 0)
    # or "latent_concat" (the image enters through extra input channels; no change inside the model).
    image_condition_type: str | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads_num != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by heads_num {self.heads_num}"
            )
        if sum(self.rope_dim_list) != self.head_dim:
            raise ValueError(
                f"sum(rope_dim_list) = {sum(self.rope_dim_list)} must equal head_dim {self.head_dim}"
            )
        if self.image_condition_type not in (None, "token_replace", "latent_concat"):
            raise ValueError(f"image_condition_type must be None, token_replace or latent_concat, "
                             f"got {self.image_condition_type!r}")
        if len(self.patch_size) != 3 or len(self.rope_dim_list) != 3:
            raise ValueError("patch_size and rope_dim_list must both have 3 entries (t, h, w)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads_num

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_width_ratio)

    def with_updates(self, **changes) -> DiTConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DiTConfig:
        """Build from a JSON-style dict; unknown keys are an error (a typo must not be ignored)."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown DiT config keys: {sorted(unknown)}")
        tuples = {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
        return cls(**{**values, **tuples})


HUNYUAN_VIDEO_CONFIG: dict[str, DiTConfig] = {
    "HYVideo-T/2": DiTConfig(guidance_embed=False),
    "HYVideo-T/2-cfgdistill": DiTConfig(guidance_embed=True),
}
