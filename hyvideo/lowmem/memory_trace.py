"""Traced activation peaks of the real code at full size: the DiT forward and one VAE tile decode.

Each trace builds the real module on the meta device, gives it fake (unallocated) tensors and runs its real
forward under FakeTensorMode with `LiveBytes` counting live tensor bytes (hyvideo/lowmem/live_bytes.py).
The DiT is traced with one double-stream and one single-stream block: the blocks run one after another and
each returns tensors of its input's size, so one of each has the whole model's peak; the token refiner, the
embedders and the final layer run as in the full model. Results are cached per shape.

Traced on the CPU with the sdpa attention backend (flash-attn's output needs no transposed copy, so a GPU
run with flash holds at most as much). Nothing here allocates real memory.
"""

from __future__ import annotations

import functools
import math

import torch

from hyvideo.constants import DiTConfig
from hyvideo.lowmem.live_bytes import LiveBytes, fake_tensors, materialize_fake


def _dit_inputs(config: DiTConfig, latent_thw: tuple[int, int, int], batch: int, text_len: int,
                dtype: torch.dtype) -> dict:
    tokens = math.prod(n // p for n, p in zip(latent_thw, config.patch_size, strict=True))
    head_dim = config.hidden_size // config.heads_num
    inputs = {
        "x": torch.empty(batch, config.in_channels, *latent_thw, dtype=dtype),
        "t": torch.empty(batch),
        "text_states": torch.empty(batch, text_len, config.text_states_dim, dtype=dtype),
        "text_mask": None,  # every text token valid: the longest text sequence
        "text_states_2": torch.empty(batch, config.text_states_dim_2, dtype=dtype),
        "freqs_cos": torch.empty(tokens, head_dim),
        "freqs_sin": torch.empty(tokens, head_dim),
    }
    if config.guidance_embed:
        inputs["guidance"] = torch.empty(batch)
    return inputs


def build_dit_for_trace(config: DiTConfig, dtype: torch.dtype, use_fp8: bool, chunk_tokens: int | None):
    """The DiT with one block of each kind, on the meta device (fp8 block linears when `use_fp8`)."""
    from hyvideo.modules import HYVideoDiffusionTransformer
    from hyvideo.modules.fp8_optimization import convert_fp8_linear, fp8_layer_names

    small = config.with_updates(mm_double_blocks_depth=1, mm_single_blocks_depth=1)
    with torch.device("meta"):
        model = HYVideoDiffusionTransformer(small, dtype=dtype, attention_backend="sdpa").eval()
    if use_fp8:
        scales = {name: torch.ones(()) for name in fp8_layer_names(model)}
        convert_fp8_linear(model, scales, compute_dtype=dtype, device="meta")
    model.set_chunk_tokens(chunk_tokens)
    return model


def dit_peak(model, inputs: dict) -> int:
    """Peak live bytes of one forward of `model` on `inputs` (real or fake), inputs included, weights not."""
    with torch.no_grad(), LiveBytes() as counter:
        counter.track(*(v for v in inputs.values() if isinstance(v, torch.Tensor)))
        model(**inputs)
    return counter.peak


@functools.lru_cache(maxsize=32)
def traced_dit_peak(config: DiTConfig, latent_thw: tuple[int, int, int], *, batch: int, text_len: int,
                    dtype: torch.dtype, use_fp8: bool, chunk_tokens: int | None) -> int:
    """Peak activation bytes of one full-size DiT forward (inputs included, weights not).

    Args:
        config: the DiT architecture (depths are ignored: one block of each kind is traced).
        latent_thw: latent (T, H, W). batch: DiT batch (2 under real CFG). text_len: LLM tokens.
        dtype: compute dtype. use_fp8: fp8 block linears (their dequantised weights are transients).
        chunk_tokens: the blocks' token chunking (None automatic, 0 off).
    """
    model = build_dit_for_trace(config, dtype, use_fp8, chunk_tokens)
    with fake_tensors():
        materialize_fake(model)
        return dit_peak(model, _dit_inputs(config, latent_thw, batch, text_len, dtype))


@functools.lru_cache(maxsize=32)
def traced_vae_tile_peak(latent_tile: tuple[int, int, int], *, batch: int, dtype: torch.dtype) -> int:
    """Peak activation bytes of decoding one latent tile (T, h, w) with the full-size VAE decoder.

    Traced under CPU autocast in `dtype` like the pipeline's decode (GroupNorm then computes in float32);
    the tile's latents are included, the weights are not.
    """
    from hyvideo.vae import AutoencoderKLCausal3D, VAEConfig

    with torch.device("meta"):
        vae = AutoencoderKLCausal3D(VAEConfig()).to(dtype).eval()
    with fake_tensors():
        materialize_fake(vae)
        z = torch.empty(batch, vae.config.latent_channels, *latent_tile, dtype=dtype)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype), LiveBytes() as counter:
            counter.track(z)
            vae.decoder(vae.post_quant_conv(z))
    return counter.peak
