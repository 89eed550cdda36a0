"""How the reference image conditions the sampler: image latents, initial latents, model input, the step.

token_replace: latent frame 0 is the image latent throughout; the scheduler only steps frames 1..T-1.
latent_concat (the first, 33-channel release): the DiT input is [latents | image latent on frame 0 | mask].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyvideo.i2v.settings import I2V_CONDITION_TYPES, STABILITY_IMAGE_WEIGHT


def encode_image_latents(
    vae,
    pixels: torch.Tensor,
    *,
    vae_dtype: torch.dtype,
    use_autocast: bool = True,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Bucketed image (B, 3, 1, H, W) in [-1, 1] -> scaled latents (B, C, 1, H/8, W/8) in `vae_dtype`.

    Parity: untiled (the original only enables tiling for decoding), the posterior mean, times the scaling
    factor, under autocast in the VAE precision.
    """
    vae.disable_tiling()
    device = device or next(vae.parameters()).device
    autocast = use_autocast and vae_dtype != torch.float32
    x = pixels.to(device) if autocast else pixels.to(device, next(vae.parameters()).dtype)
    with torch.inference_mode(), torch.autocast(device.type, dtype=vae_dtype, enabled=autocast):
        latents = vae.encode(x).mode() * vae.config.scaling_factor
    return latents.to(vae_dtype)


def stability_mix(noise: torch.Tensor, image_latents: torch.Tensor) -> torch.Tensor:
    """--i2v-stability: noise * 0.999 + image * (1 - 0.999), in float32, cast back to the noise dtype.

    Parity: the original multiplies by a float32 tensor t = 0.999 and 1 - t, so the image weight is
    float32's 1 - 0.999, not exactly 0.001; the image latent is repeated over every frame.
    """
    t = torch.tensor([1.0 - STABILITY_IMAGE_WEIGHT], dtype=torch.float32, device=noise.device)
    image = image_latents.to(noise.device).expand_as(noise)
    return (noise * t + image * (1 - t)).to(noise.dtype)


def concat_condition(image_latents: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """latent_concat: (cond (B, C, T, h, w) = image latent on frame 0, zeros after; mask (B, 1, T, h, w))."""
    batch, channels, _, h, w = image_latents.shape
    cond = image_latents.new_zeros(batch, channels, frames, h, w)
    cond[:, :, :1] = image_latents
    mask = image_latents.new_zeros(batch, 1, frames, h, w)
    mask[:, :, 0] = 1
    return cond, mask


@dataclass
class ImageCondition:
    """The reference image for one pipeline call: its latents (B, C, 1, h, w) and how they condition."""

    latents: torch.Tensor
    condition_type: str = "token_replace"
    stability: bool = False

    def __post_init__(self) -> None:
        if self.condition_type not in I2V_CONDITION_TYPES:
            raise ValueError(
                f"condition_type must be one of {I2V_CONDITION_TYPES}, got {self.condition_type!r}"
            )

    def repeat(self, n: int) -> ImageCondition:
        return ImageCondition(self.latents.repeat_interleave(n, dim=0), self.condition_type, self.stability)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """The noise (B, C, T, h, w), stability-mixed when asked (latent_concat: always, as released)."""
        if self.stability or self.condition_type == "latent_concat":
            return stability_mix(noise, self.latents)
        return noise

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """What the DiT sees: frame 0 replaced by the image (token_replace), or the 33-channel concat."""
        image = self.latents.to(latents.device, latents.dtype)
        if self.condition_type == "token_replace":
            return torch.cat((image, latents[:, :, 1:]), dim=2)
        cond, mask = concat_condition(image, latents.shape[2])
        return torch.cat((latents, cond, mask), dim=1)

    def step(self, scheduler, velocity: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One scheduler step; token_replace steps frames 1.. only and puts the image back as frame 0."""
        if self.condition_type != "token_replace":
            return scheduler.step(velocity, t, latents)
        stepped = scheduler.step(velocity[:, :, 1:], t, latents[:, :, 1:])
        return torch.cat((self.latents.to(stepped.device, stepped.dtype), stepped), dim=2)
