"""Peak accelerator memory of one text-to-video run, per stage, and which settings fit a card.

Nothing is loaded or allocated. The activation peaks of the DiT forward and of one VAE tile decode are traced:
the real code runs at the real shapes and dtypes under FakeTensorMode with a counter of live tensor bytes
(hyvideo/lowmem/memory_trace.py, proven against real tensors in tests/test_memory_trace.py). Weights come
from exact parameter counts (checked against the model). The text encoder's small activations, the decoded
video copies and the runtime overhead are arithmetic. Figures are allocated bytes: keep ~10% for the
allocator.

Stages and what is on the accelerator during each, per offload mode (hyvideo.lowmem.offload.OFFLOAD_MODES):

| mode       | encode (text)            | denoise (DiT)                    | decode (VAE)           |
|------------|--------------------------|----------------------------------|------------------------|
| none       | all weights              | all weights                      | all weights            |
| model      | text encoders            | DiT                              | VAE                    |
| block      | CLIP + LLM rest + 2 LLM layers + rests | DiT rest + (prefetch + 1) blocks + LLM rest | VAE + rests |
| sequential | DiT + largest LLM leaf   | DiT                              | DiT + largest VAE leaf |

("DiT rest" = everything outside double_blocks / single_blocks, ~0.36B parameters; "LLM rest" = its
embedding table and final norm, ~0.53B parameters, resident while its decoder layers stream.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hyvideo.constants import HUNYUAN_VIDEO_CONFIG, PRECISIONS, DiTConfig
from hyvideo.lowmem.offload import OFFLOAD_MODES
from hyvideo.utils.data_utils import align_to

GIB = 1 << 30
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

# Activations are traced, not estimated: no calibration factor (kept as a name for callers, now 1).
RESERVED_PER_ALLOCATED = 1.0
# CUDA context, cuBLAS/cuDNN workspaces and the like: present in every stage.
RUNTIME_OVERHEAD_GIB = 1.0

VAE_VIDEO_COPIES = 3  # decoded video (blended result), video / 2 and + 0.5, before clamping and moving to the CPU
VAE_PARAMS = 246_478_803  # official_spec.md §3.4
VAE_LARGEST_LEAF_PARAMS = 512 * 512 * 27 + 512  # a 3x3x3 conv of the 512-channel blocks

CLIP_TEXT_PARAMS = 123_060_480  # openai/clip-vit-large-patch14 text tower


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of the LLM text encoder that set its size."""

    vocab: int = 128_256
    hidden: int = 4096
    layers: int = 32
    intermediate: int = 14_336
    heads: int = 32
    kv_heads: int = 8

    @property
    def params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.vocab * self.hidden + self.layers * layer + self.hidden

    @property
    def largest_leaf_params(self) -> int:
        return self.vocab * self.hidden  # embed_tokens

    @property
    def rest_params(self) -> int:
        return self.vocab * self.hidden + self.hidden  # embed_tokens + final norm

    @property
    def layer_params(self) -> int:
        return (self.params - self.rest_params) // self.layers


LLAVA_LLAMA3_8B = LlamaShape()
LLM_TOKENS = 256 + 95  # text_len + the video template prefix that is cropped afterwards


# --------------------------------------------------------------------------------------------------
# Parameter counts of the DiT
# --------------------------------------------------------------------------------------------------


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _timestep_embedder(d: int) -> int:
    return _linear(256, d) + _linear(d, d)


@dataclass(frozen=True)
class DiTSizes:
    """Parameter counts of a DiT config; `*_fp8_weights` are the block linear weights fp8 stores in 1 byte."""

    double_block: int
    single_block: int
    rest: int  # everything outside the two block lists
    final_linear: int  # stored in float32 (a quirk of the original kept by our model)
    double_fp8_weights: int
    single_fp8_weights: int

    @classmethod
    def from_config(cls, c: DiTConfig) -> DiTSizes:
        d, m, hd = c.hidden_size, c.mlp_hidden_dim, c.head_dim
        qk = 2 * hd if c.qk_norm else 0
        stream_w = 6 * d * d + 3 * d * d + d * d + 2 * d * m  # modulation, qkv, proj, fc1, fc2
        stream = _linear(d, 6 * d) + _linear(d, 3 * d) + qk + _linear(d, d) + _linear(d, m) + _linear(m, d)
        single_w = d * (3 * d + m) + (d + m) * d + 3 * d * d
        single = _linear(d, 3 * d + m) + _linear(d + m, d) + qk + _linear(d, 3 * d)
        refiner_block = 4 * d + _linear(d, 3 * d) + _linear(d, d) + _linear(d, m) + _linear(m, d)
        refiner_block += _linear(d, 2 * d)
        txt_in = _linear(c.text_states_dim, d) + _timestep_embedder(d)
        txt_in += _linear(c.text_states_dim, d) + _linear(d, d) + c.refiner_depth * refiner_block
        final_linear = _linear(d, math.prod(c.patch_size) * c.out_channels)
        rest = c.in_channels * math.prod(c.patch_size) * d + d  # img_in
        rest += txt_in + _timestep_embedder(d) * (2 if c.guidance_embed else 1)
        rest += _linear(c.text_states_dim_2, d) + _linear(d, d)  # vector_in
        rest += final_linear + _linear(d, 2 * d)  # final_layer
        return cls(2 * stream, single, rest, final_linear, 2 * stream_w, single_w)

    def total(self, c: DiTConfig) -> int:
        blocks = c.mm_double_blocks_depth * self.double_block + c.mm_single_blocks_depth * self.single_block
        return blocks + self.rest

    def block_bytes(self, *, double: bool, weight_bytes: int, use_fp8: bool) -> int:
        params = self.double_block if double else self.single_block
        fp8 = (self.double_fp8_weights if double else self.single_fp8_weights) if use_fp8 else 0
        return fp8 + (params - fp8) * weight_bytes

    def rest_bytes(self, weight_bytes: int) -> int:
        return (self.rest - self.final_linear) * weight_bytes + self.final_linear * 4


# --------------------------------------------------------------------------------------------------
# Estimate
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagePeak:
    """Accelerator memory during one stage: resident weights + transient tensors + runtime overhead (GiB)."""

    name: str
    weights_gib: float
    transient_gib: float
    total_gib: float


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak accelerator memory of one run, with its breakdown (GiB = 2^30 bytes)."""

    height: int
    width: int
    video_length: int
    precision: str
    use_fp8: bool
    offload_mode: str
    cfg_scale: float
    vae_tiling: bool
    tokens: int  # DiT sequence length per sample: video tokens + text_len
    batch: int  # DiT batch (doubled by real CFG)
    dit_weights_gib: float  # DiT weights on the accelerator while denoising
    dit_weights_total_gib: float
    text_encoder_weights_gib: float  # LLM + CLIP
    vae_weights_gib: float
    activations_gib: float  # DiT live tensors at the peak (what max_memory_allocated would add)
    activations_reserved_gib: float  # the same, times RESERVED_PER_ALLOCATED
    vae_decode_workspace_gib: float
    host_weights_gib: float  # weights waiting in CPU memory under this mode
    stages: tuple[StagePeak, ...]
    vae_tile: tuple[int, int] = (256, 64)  # decode tile (pixels, frames)

    @property
    def peak_gib(self) -> float:
        return max(s.total_gib for s in self.stages)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda s: s.total_gib).name

    def fits(self, card_gib: float) -> bool:
        return self.peak_gib <= card_gib

    @property
    def label(self) -> str:
        weights = f"{self.precision}+fp8" if self.use_fp8 else self.precision
        return f"{self.height}x{self.width}x{self.video_length} {weights} offload={self.offload_mode}"


def vae_tile_latent(t_lat: int, h_lat: int, w_lat: int, *, tiling: bool, tile_size: int = 256,
                    tile_frames: int = 64) -> tuple[int, int, int]:
    """Latent (T, h, w) of the largest single decoder call: one tile, or the whole video without tiling."""
    if not tiling:
        return t_lat, h_lat, w_lat
    lat_t, lat_s = tile_frames // 4, tile_size // 8
    t_lat = lat_t + 1 if t_lat > lat_t else t_lat  # a temporal tile decodes lat_t + 1 latent frames
    if max(h_lat, w_lat) > lat_s:
        h_lat, w_lat = min(h_lat, lat_s), min(w_lat, lat_s)
    return t_lat, h_lat, w_lat


def _check_inputs(height: int, width: int, video_length: int, precision: str, offload_mode: str) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"video size must be positive, got {height}x{width}")
    if video_length < 1 or (video_length - 1) % 4:
        raise ValueError(f"video_length must be 1 or 4k+1 frames, got {video_length}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if offload_mode not in OFFLOAD_MODES:
        raise ValueError(f"offload_mode must be one of {OFFLOAD_MODES}, got {offload_mode!r}")


def estimate_peak_memory(
    *,
    height: int,
    width: int,
    video_length: int,
    precision: str = "bf16",
    use_fp8: bool = False,
    offload_mode: str = "none",
    cfg_scale: float = 1.0,
    vae_tiling: bool = True,
    text_len: int = 256,
    dit_config: DiTConfig = HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"],
    batch_size: int = 1,
    prefetch: int = 1,
    vae_precision: str = "fp16",
    text_encoder_precision: str = "fp16",
    dit_chunk_tokens: int | None = None,
    vae_tile_size: int = 256,
    vae_tile_frames: int = 64,
) -> MemoryEstimate:
    """Peak accelerator memory of one run: traced activations + resident weights (see the module docstring).

    Args:
        height, width: pixels (rounded up to multiples of 16 as the sampler does). video_length: 1 or 4k+1.
        precision: DiT weights and compute dtype. use_fp8: fp8 block linear weights (`--use-fp8`).
        offload_mode: one of OFFLOAD_MODES (see hyvideo.lowmem.offload.apply_offload).
        cfg_scale: > 1 runs real classifier-free guidance, doubling the DiT batch.
        vae_tiling: tiled decoding (the default); untiled needs the whole video's decoder activations.
        text_len: LLM tokens given to the DiT. batch_size: videos denoised together.
        prefetch: blocks copied ahead under block offload.
        dit_chunk_tokens: the DiT's token chunking (None automatic, 0 off; hyvideo/lowmem/chunking.py).
        vae_tile_size, vae_tile_frames: VAE decode tile in pixels / frames.
    """
    from hyvideo.constants import PRECISION_TO_TYPE
    from hyvideo.lowmem.memory_trace import traced_dit_peak, traced_vae_tile_peak

    _check_inputs(height, width, video_length, precision, offload_mode)
    height, width = align_to(height, 16), align_to(width, 16)
    c = dit_config
    batch = batch_size * (2 if cfg_scale > 1.0 else 1)
    latent = ((video_length - 1) // 4 + 1, height // 8, width // 8)  # (T', H/8, W/8)
    img_tokens = math.prod(n // p for n, p in zip(latent, c.patch_size))
    tokens = img_tokens + text_len

    # 1. Weights
    dit_total, rest, dit_streamed = _dit_weight_bytes(c, precision, use_fp8, prefetch)
    te_bytes, vae_bytes = _BYTES[text_encoder_precision], _BYTES[vae_precision]
    te = (LLAVA_LLAMA3_8B.params + CLIP_TEXT_PARAMS) * te_bytes
    vae = VAE_PARAMS * vae_bytes

    # 2. Transients per stage: the DiT forward and one VAE tile are traced; latents, scheduler copies and
    #    the decoded video copies are arithmetic
    activations = traced_dit_peak(c, latent, batch=batch, text_len=text_len, dtype=PRECISION_TO_TYPE[precision],
                                  use_fp8=use_fp8, chunk_tokens=dit_chunk_tokens)
    small = 3 * batch * c.in_channels * math.prod(latent) * 4  # latents, noise prediction, scheduler step
    llm = LLAVA_LLAMA3_8B
    encode = batch * LLM_TOKENS * ((llm.layers + 1) * llm.hidden + 3 * llm.intermediate) * te_bytes
    tile = vae_tile_latent(*latent, tiling=vae_tiling, tile_size=vae_tile_size, tile_frames=vae_tile_frames)
    decode_ws = traced_vae_tile_peak(tile, batch=batch_size, dtype=PRECISION_TO_TYPE[vae_precision])
    decode = decode_ws + VAE_VIDEO_COPIES * batch_size * 3 * video_length * height * width * vae_bytes
    transients = (encode, activations + small, decode)

    # 3. Weights on the accelerator per stage (encode, denoise, decode), and waiting in host memory. Under
    #    block offload the LLM's decoder layers stream like the DiT's blocks; its rest stays resident.
    llm_rest = llm.rest_params * te_bytes
    llm_streamed = llm_rest + (prefetch + 1) * llm.layer_params * te_bytes + CLIP_TEXT_PARAMS * te_bytes
    resident = {
        "none": (te + dit_total + vae,) * 3,
        "model": (te, dit_total, vae),
        "block": (llm_streamed + rest, dit_streamed + llm_rest, vae + rest + llm_rest),
        "sequential": (dit_total + llm.largest_leaf_params * te_bytes, dit_total,
                       dit_total + VAE_LARGEST_LEAF_PARAMS * vae_bytes),
    }[offload_mode]
    host = {"none": 0, "model": te + dit_total + vae, "block": te - llm_rest + vae + dit_total - rest,
            "sequential": te + vae}[offload_mode]
    stages = tuple(StagePeak(name, w / GIB, t / GIB, (w + t) / GIB + RUNTIME_OVERHEAD_GIB)
                   for name, w, t in zip(("encode", "denoise", "decode"), resident, transients))
    return MemoryEstimate(
        height=height, width=width, video_length=video_length, precision=precision, use_fp8=use_fp8,
        offload_mode=offload_mode, cfg_scale=cfg_scale, vae_tiling=vae_tiling, tokens=tokens, batch=batch,
        dit_weights_gib=(dit_streamed if offload_mode == "block" else dit_total) / GIB,
        dit_weights_total_gib=dit_total / GIB, text_encoder_weights_gib=te / GIB, vae_weights_gib=vae / GIB,
        activations_gib=activations / GIB,
        activations_reserved_gib=activations / GIB,
        vae_decode_workspace_gib=decode_ws / GIB, host_weights_gib=host / GIB, stages=stages,
        vae_tile=(vae_tile_size, vae_tile_frames),
    )


def _dit_weight_bytes(c: DiTConfig, precision: str, use_fp8: bool, prefetch: int) -> tuple[int, int, int]:
    """(whole DiT, everything outside the blocks, what block offload keeps on the device) in bytes."""
    sizes, w_bytes = DiTSizes.from_config(c), _BYTES[precision]
    lists = [(True, c.mm_double_blocks_depth), (False, c.mm_single_blocks_depth)]
    per_block = {double: sizes.block_bytes(double=double, weight_bytes=w_bytes, use_fp8=use_fp8)
                 for double, _ in lists}
    rest = sizes.rest_bytes(w_bytes)
    total = rest + sum(per_block[double] * n for double, n in lists)
    largest = max((per_block[double] for double, n in lists if n), default=0)
    streamed = rest + min(prefetch + 1, sum(n for _, n in lists)) * largest
    return total, rest, streamed


# --------------------------------------------------------------------------------------------------
# What fits a card
# --------------------------------------------------------------------------------------------------

# The README's supported sizes (one orientation each; the transposed size has the same token count).
DEFAULT_SIZES: tuple[tuple[int, int, int], ...] = (
    (720, 1280, 129), (960, 960, 129), (544, 960, 129), (720, 720, 129), (544, 960, 65),
)
# Fastest first: fewer bytes moved per step. "sequential" keeps the DiT resident but streams the text
# encoders and the VAE submodule by submodule.
_SPEED_ORDER = {"none": 0, "model": 1, "block": 2, "sequential": 3}


def plan_for_card(
    gib: float,
    *,
    sizes: Sequence[tuple[int, int, int]] = DEFAULT_SIZES,
    precision: str = "bf16",
    cfg_scale: float = 1.0,
    modes: Sequence[str] = OFFLOAD_MODES,
    fp8_options: Sequence[bool] = (False, True),
    vae_tiling_options: Sequence[bool] = (True,),
) -> list[MemoryEstimate]:
    """Every (size, fp8, offload mode, tiling) combination whose estimated peak fits `gib` GiB.

    Sorted by size as given, then fastest first (less offloading, then no fp8). Estimates: keep a margin.
    """
    if gib <= 0:
        raise ValueError(f"card memory must be a positive number of GiB, got {gib}")
    fitting = []
    for index, (height, width, frames) in enumerate(sizes):
        for mode in modes:
            for use_fp8 in fp8_options:
                for tiling in vae_tiling_options:
                    est = estimate_peak_memory(height=height, width=width, video_length=frames,
                                               precision=precision, use_fp8=use_fp8, offload_mode=mode,
                                               cfg_scale=cfg_scale, vae_tiling=tiling)
                    if est.fits(gib):
                        fitting.append((index, _SPEED_ORDER[mode], use_fp8, not tiling, est))
    return [row[-1] for row in sorted(fitting, key=lambda r: r[:4])]


# VAE decode tiles tried when the default does not fit, largest first (pixels, frames); each keeps the
# original's overlap geometry (the kept part of a tile equals its stride).
SMALLER_VAE_TILES: tuple[tuple[int, int], ...] = ((256, 64), (192, 64), (128, 64), (128, 32), (128, 16))


def fit_vae_tiles(card_gib: float, **kwargs) -> MemoryEstimate:
    """The estimate with the largest VAE tiles (from SMALLER_VAE_TILES) that fits `card_gib`, else the
    smallest tiles' estimate. `kwargs` as for `estimate_peak_memory` (without the tile sizes)."""
    estimate = None
    for size, frames in SMALLER_VAE_TILES:
        estimate = estimate_peak_memory(vae_tile_size=size, vae_tile_frames=frames, **kwargs)
        if estimate.fits(card_gib):
            break
    return estimate


def _tile_label(e: MemoryEstimate) -> str:
    return f"{e.vae_tile[0]}/{e.vae_tile[1]}" if e.vae_tiling else "off"


def format_plan(
    estimates: MemoryEstimate | Sequence[MemoryEstimate], *, card_gib: float | None = None
) -> str:
    """A readable table of estimates (one row each, peak per stage in GiB)."""
    rows = [estimates] if isinstance(estimates, MemoryEstimate) else list(estimates)
    title = "Peak accelerator memory, GiB: activations traced (real code, full-size shapes, FakeTensorMode), "
    title += "weights from parameter counts; allocated bytes, keep ~10% margin"
    if card_gib is not None:
        title += f" -- card: {card_gib:g} GiB"
    header = (f"{'size':>14} {'tokens':>7} {'weights':>9} {'offload':>10} {'cfg':>4} {'tile':>7} "
              f"{'DiT w':>6} {'act':>6} {'VAE ws':>6} {'encode':>7} {'denoise':>7} {'decode':>7} {'peak':>6} "
              f"{'host':>6}")
    lines = [title, header, "-" * len(header)]
    for e in rows:
        weights = f"{e.precision}+fp8" if e.use_fp8 else e.precision
        enc, den, dec = (s.total_gib for s in e.stages)
        fits = "" if card_gib is None else ("  fits" if e.fits(card_gib) else "  too big")
        lines.append(
            f"{e.height:>4}x{e.width:<4}x{e.video_length:<4} {e.tokens:>7} {weights:>9} {e.offload_mode:>10} "
            f"{e.cfg_scale:>4g} {_tile_label(e):>7} {e.dit_weights_gib:>6.1f} "
            f"{e.activations_reserved_gib:>6.1f} {e.vae_decode_workspace_gib:>6.1f} {enc:>7.1f} {den:>7.1f} "
            f"{dec:>7.1f} {e.peak_gib:>6.1f} {e.host_weights_gib:>6.1f}{fits}"
        )
    lines.append("DiT w: DiT weights on the accelerator while denoising; act: traced DiT activation peak; VAE ws: "
                 "traced peak of one tile decode; host: weights waiting in CPU RAM.")
    return "\n".join(lines)
