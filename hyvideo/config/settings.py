"""The typed configuration the library reads: frozen dataclasses filled from the flags by `cli.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hyvideo.constants import DiTConfig
from hyvideo.diffusion.cache import CacheConfig
from hyvideo.i2v.settings import I2VConfig
from hyvideo.prompt_rewrite import RewriteConfig

DIT_SUBDIR = "hunyuan-video-t2v-720p"
DIT_FILE = "mp_rank_00_model_states.pt"
DIT_FP8_FILE = "mp_rank_00_model_states_fp8.pt"


@dataclass(frozen=True)
class LoraSpec:
    """One --lora: the safetensors file and its scale."""

    path: Path
    scale: float = 1.0
    ignore_alpha: bool = False  # factor 1 instead of alpha / rank (HunyuanVideo-I2V's effect LoRAs)


@dataclass(frozen=True)
class ModelConfig:
    """What is loaded, from where, and in which precision."""

    model: str
    dit: DiTConfig
    precision: str
    model_base: Path
    dit_weight: Path | None  # None: the official file under model_base
    load_key: str
    use_fp8: bool
    attn_backend: str
    vae: str
    vae_precision: str
    vae_tiling: bool
    text_encoder: str
    text_encoder_precision: str
    text_len: int
    tokenizer: str
    prompt_template: str
    prompt_template_video: str
    hidden_state_skip_layer: int
    apply_final_norm: bool
    text_encoder_2: str
    text_encoder_precision_2: str
    tokenizer_2: str
    text_len_2: int
    loras: tuple[LoraSpec, ...] = ()  # --lora, applied in order after the DiT is loaded
    compile: bool = False  # --compile: regional torch.compile of the DiT blocks (hyvideo/modules/compile.py)
    compile_mode: str = "default"
    fp8_gemm: bool = False  # --fp8-gemm: fp8 matmuls in the block linears (hyvideo/modules/fp8_gemm.py)
    # --dit-chunk-tokens: None automatic, 0 off (hyvideo/lowmem/chunking.py)
    dit_chunk_tokens: int | None = None
    dit_subdir: str = DIT_SUBDIR  # the DiT + VAE folder under model_base (I2V: hunyuan-video-i2v-720p)
    text_encoder_subdir: str = "text_encoder"  # I2V: text_encoder_i2v (the whole LLaVA)
    # --vae-tile-size / --vae-tile-frames: VAE decode tile in pixels / frames; None: the VAE config.json's
    # sample_size / sample_tsize (the released VAE's 256 px / 64 frames).
    vae_tile_size: int | None = None
    vae_tile_frames: int | None = None

    @property
    def dit_weight_path(self) -> Path:
        if self.dit_weight is not None:
            return self.dit_weight
        name = DIT_FP8_FILE if self.use_fp8 else DIT_FILE
        return self.model_base / self.dit_subdir / "transformers" / name

    @property
    def vae_path(self) -> Path:
        return self.model_base / self.dit_subdir / "vae"

    @property
    def text_encoder_path(self) -> Path:
        return self.model_base / self.text_encoder_subdir

    @property
    def text_encoder_2_path(self) -> Path:
        return self.model_base / "text_encoder_2"


@dataclass(frozen=True)
class SamplingConfig:
    """What to generate and how to denoise it."""

    prompts: tuple[str, ...]
    neg_prompt: str | None
    height: int
    width: int
    video_length: int
    infer_steps: int
    seed: int | None
    cfg_scale: float
    embedded_cfg_scale: float
    flow_shift: float
    flow_reverse: bool
    flow_solver: str
    denoise_type: str
    num_videos: int
    batch_size: int


@dataclass(frozen=True)
class RuntimeConfig:
    """Where outputs go and how the work is spread over devices."""

    save_path: Path
    disable_autocast: bool
    offload_mode: str  # "none", "model", "block" or "sequential" (see hyvideo/lowmem/offload.py)
    plan_memory: float | None  # --plan-memory: print the memory plan (for a card of this many GiB) and exit
    # None (both): chosen from the world size at launch (hyvideo/parallel/layout.py)
    ulysses_degree: int | None
    ring_degree: int | None
    crf: int
    save_latents: bool
    decode_latents: Path | None
    # This process's place in a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK); 0, 1, 0 without torchrun.
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    memory_check: bool = True  # refuse runs estimated not to fit the device (off: --no-memory-check)
    cfg_parallel: bool = False  # --cfg-parallel: the two guidance branches on two halves of the processes
    shard_weights: bool = False  # --shard-weights: FSDP2-shard the DiT over all processes
    local_world_size: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def auto_layout(self) -> bool:
        """No degree was given: the layout is chosen from the world size and the DiT's head count."""
        return self.ulysses_degree is None and self.ring_degree is None

    @property
    def sequence_parallel_degree(self) -> int:
        if self.auto_layout:
            return self.world_size // (2 if self.cfg_parallel else 1)
        return (self.ulysses_degree or 1) * (self.ring_degree or 1)

    @property
    def is_main_process(self) -> bool:
        """The process that logs INFO, shows progress bars and writes files (global rank 0)."""
        return self.rank == 0


@dataclass(frozen=True)
class Configs:
    model: ModelConfig
    sampling: SamplingConfig
    runtime: RuntimeConfig
    rewrite: RewriteConfig = RewriteConfig()  # --prompt-rewrite (off by default)
    cache: CacheConfig = CacheConfig()  # --cache*: step caching (off by default)
    i2v: I2VConfig = I2VConfig()  # --i2v-*: image-to-video (off by default)
