"""Typed settings of the image-to-video mode (filled from the --i2v-* flags by hyvideo/config/)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

I2V_CONDITION_TYPES = ("token_replace", "latent_concat")
I2V_DIT_SUBDIR = "hunyuan-video-i2v-720p"
I2V_TEXT_ENCODER_SUBDIR = "text_encoder_i2v"  # the whole LLaVA (vision tower + projector + LM)
I2V_FLOW_SHIFT = 17.0  # the I2V repository's default ("dynamic" recipe); T2V uses 7.0
T2V_FLOW_SHIFT = 7.0
# Parity: the released latent_concat decode drops the first 4 frames of the video.
LATENT_CONCAT_DROPPED_FRAMES = 4
STABILITY_IMAGE_WEIGHT = 0.001  # --i2v-stability: initial latents = 0.999 noise + 0.001 image


@dataclass(frozen=True)
class I2VConfig:
    """Image-to-video settings; `enabled` False is plain text-to-video."""

    enabled: bool = False
    image_path: Path | None = None
    resolution: str = "720p"
    condition_type: str = "token_replace"
    stability: bool = False

    @property
    def interleave(self) -> int:
        """Keep every k-th of the 576 image tokens in the LLM conditioning (4 -> 144, 2 -> 288)."""
        return 4 if self.condition_type == "token_replace" else 2
