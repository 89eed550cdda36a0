"""Command-line flags and the typed configuration they become.

This is the only module that sees the argparse namespace or reads environment variables. Every flag of
the original `hyvideo/config.py` is accepted with the same name, type, default and choices, so the
original's example commands run unchanged; the differences are listed in README.md ("Flag reference")
and marked `# Differs:` below.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from hyvideo.constants import (
    HUNYUAN_VIDEO_CONFIG,
    PRECISIONS,
    PROMPT_TEMPLATE,
    VAE_LATENT_CHANNELS,
    VAE_TYPES,
    DiTConfig,
)
from hyvideo.diffusion.cache import (
    CACHE_POLICIES,
    DEFAULT_MAX_SKIP,
    DEFAULT_RETENTION,
    CacheConfig,
    settings_errors,
)
from hyvideo.diffusion.cache_tables import DEFAULT_THRESHOLDS, load_ratios_file
from hyvideo.i2v.image import I2V_RESOLUTIONS
from hyvideo.i2v.settings import (
    I2V_CONDITION_TYPES,
    I2V_DIT_SUBDIR,
    I2V_FLOW_SHIFT,
    I2V_TEXT_ENCODER_SUBDIR,
    T2V_FLOW_SHIFT,
    I2VConfig,
)
from hyvideo.lowmem.offload import OFFLOAD_MODES
from hyvideo.modules.attention import attention_backend_problem
from hyvideo.modules.compile import COMPILE_MODES
from hyvideo.prompt_rewrite import API_KEY_ENV_VARS, REWRITE_MODES, RewriteConfig

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "fa3", "flash", "sage", "sdpa", "vanilla")
# Differs: the original lists both encoders for every encoder flag; only these combinations work.
PRIMARY_ENCODERS = ("llm",)
SECONDARY_ENCODERS = ("clipL",)
# Flags the original parses but never reads. We accept them so old commands keep working.
NO_EFFECT_FLAGS = (
    "model_resolution",
    "use_linear_quadratic_schedule",
    "linear_schedule_end",
    "seed_type",
    "name_suffix",
    "reproduce",
)
DIT_SUBDIR = "hunyuan-video-t2v-720p"
DIT_FILE = "mp_rank_00_model_states.pt"
DIT_FP8_FILE = "mp_rank_00_model_states_fp8.pt"
# VAE decode tiles overlap by 25 % of whole latents: 4 x the 884 VAE's 8x spatial / 4x temporal compression.
VAE_TILE_SIZE_MULTIPLE = 32
VAE_TILE_FRAMES_MULTIPLE = 16

# Upper bounds that stop typos (an extra 0) long before they turn into hours of work or a killed process.
# They are generous: the released model was trained up to 720x1280 and 129 frames.
# 4096 px a side: 3.2x the largest trained side; a 4096x4096 image is ~65k tokens, about the 119k of the
# largest trained video. 1025 frames: 8x the trained 129 (257 latent frames); RoPE extends but quality does
# not. 1000 steps: the flow schedule has 1000 training timesteps, more steps only repeat them.
# 64 videos per prompt (--num-videos x --batch-size): a whole grid of seeds in one run.
MAX_VIDEO_SIDE = 4096
MAX_VIDEO_LENGTH = 1025
MAX_INFER_STEPS = 1000
MAX_VIDEOS_PER_PROMPT = 64
# Seeds: torch.Generator takes a 64-bit value; under torchrun rank 0's seed travels as an int64, so every
# seed of a run (--seed ... --seed + videos - 1) must lie in [0, 2**63).
SEED_LIMIT = 2**63
EXAMPLES = """examples:
  python sample_video.py --prompt "A cat walks on the grass, realistic style." --video-size 544 960 \\
      --video-length 129 --seed 42 --model-base ckpts
  python sample_video.py --prompt-file prompts.txt --video-size 720 1280 --use-cpu-offload --use-fp8 \\
      --save-path ./results
"""

# --------------------------------------------------------------------------------------------------
# Typed configuration
# --------------------------------------------------------------------------------------------------


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
    dit_chunk_tokens: int | None = None  # --dit-chunk-tokens: None automatic, 0 off (hyvideo/lowmem/chunking.py)
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


# --------------------------------------------------------------------------------------------------
# Launch environment (torchrun)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells each process through the environment; one process without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def under_launcher(self) -> bool:
        return self.world_size > 1

    @property
    def reports_errors(self) -> bool:
        """Whether this process prints errors that every process detects identically: one per node."""
        return self.local_rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from exc


def launch_env() -> LaunchEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (each process of a launch gets its own)."""
    world_size = _env_int("WORLD_SIZE", 1)
    return LaunchEnv(
        rank=_env_int("RANK", 0), world_size=world_size, local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", world_size),
    )


def parallel_layout_errors(
    ulysses_degree: int | None, ring_degree: int | None, env: LaunchEnv, *, cfg_parallel: bool = False
) -> list[str]:
    """Problems with --ulysses-degree x --ring-degree (x 2 with --cfg-parallel) against the process count.

    No degree at all: the layout is chosen at launch (only --cfg-parallel's even split is checked here);
    one degree given: the other is 1.
    """
    cfg = 2 if cfg_parallel else 1
    if ulysses_degree is None and ring_degree is None:
        if env.world_size % cfg == 0 and (env.under_launcher or not cfg_parallel):
            return []
        return [f"--cfg-parallel puts the two guidance branches on two halves of the processes: launch an "
                f"even number of them (torchrun --nproc_per_node=2 or more), not {env.world_size}"]
    ulysses_degree, ring_degree = ulysses_degree or 1, ring_degree or 1
    degree = ulysses_degree * ring_degree * cfg
    if degree == env.world_size or min(ulysses_degree, ring_degree) < 1:
        return []
    product = f"--ulysses-degree {ulysses_degree} x --ring-degree {ring_degree}" + (
        " x 2 (--cfg-parallel)" if cfg_parallel else "")
    if not env.under_launcher:
        return [f"{product} = {degree} needs {degree} processes: launch with torchrun "
                f"--nproc_per_node={degree} sample_video.py ... (or give no degree: they are then chosen "
                f"from the process count)"]
    per_branch = env.world_size // cfg
    return [f"{product} = {degree}, but torchrun launched {env.world_size} processes: choose degrees whose "
            f"product is {per_branch} (e.g. --ulysses-degree {per_branch} --ring-degree 1, or --ring-degree "
            f"{per_branch} for any head count), give no degree to have them chosen, or launch with "
            f"--nproc_per_node={degree}"]


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad value in one line (flag + reason) and exits with status 2.

    Under torchrun every process detects the same error; only local rank 0 prints it, so a node shows
    the message once (the other processes exit with status 2 silently).
    """

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if _reports_errors() else None)


def _reports_errors() -> bool:
    try:
        return launch_env().reports_errors
    except ValueError:  # a malformed LOCAL_RANK: better every process than none
        return True


def _add_network_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("HunyuanVideo network args")
    group.add_argument("--model", type=str, default="HYVideo-T/2-cfgdistill",
                       choices=list(HUNYUAN_VIDEO_CONFIG),
                       help="DiT architecture; the released weights need HYVideo-T/2-cfgdistill.")
    # Differs: the original declares type=str, which breaks its own sanity check when passed.
    group.add_argument("--latent-channels", type=int, default=16,
                       help="DiT input/output channels; must equal the VAE's latent channels (16).")
    group.add_argument("--precision", type=str, default="bf16", choices=PRECISIONS,
                       help="DiT weight dtype and the denoising autocast dtype.")
    group.add_argument("--rope-theta", type=int, default=256, help="RoPE base frequency.")


def _add_extra_models_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Extra models args, including vae, text encoders and tokenizers")
    group.add_argument("--vae", type=str, default="884-16c-hy", choices=VAE_TYPES,
                       help="VAE type: 884 = 4x time, 8x8 space; 16c = 16 latent channels.")
    group.add_argument("--vae-precision", type=str, default="fp16", choices=PRECISIONS,
                       help="VAE weight dtype and decoding autocast dtype.")
    # Differs: the original is store_true with default True, so tiling cannot be turned off.
    group.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=True,
                       help="Decode the video in overlapping tiles (default on; --no-vae-tiling needs far "
                            "more memory).")
    group.add_argument("--text-encoder", type=str, default="llm", choices=PRIMARY_ENCODERS,
                       help="Primary text encoder (only llm is supported).")
    group.add_argument("--text-encoder-precision", type=str, default="fp16", choices=PRECISIONS,
                       help="Primary text encoder dtype.")
    group.add_argument("--text-states-dim", type=int, default=4096,
                       help="Hidden size of the primary text encoder (DiT txt_in input).")
    group.add_argument("--text-len", type=int, default=256,
                       help="LLM tokens kept after the prompt-template crop.")
    group.add_argument("--tokenizer", type=str, default="llm", choices=PRIMARY_ENCODERS,
                       help="Tokenizer of the primary text encoder.")
    group.add_argument("--prompt-template", type=str, default="dit-llm-encode",
                       choices=list(PROMPT_TEMPLATE), help="Template for 1-frame (image) output.")
    group.add_argument("--prompt-template-video", type=str, default="dit-llm-encode-video",
                       choices=list(PROMPT_TEMPLATE), help="Template for video output.")
    group.add_argument("--hidden-state-skip-layer", type=int, default=2,
                       help="Use the LLM hidden state this many layers before the last.")
    group.add_argument("--apply-final-norm", action="store_true",
                       help="Apply the LLM's final norm to the selected hidden state.")
    group.add_argument("--text-encoder-2", type=str, default="clipL", choices=SECONDARY_ENCODERS,
                       help="Secondary (pooled) text encoder (only clipL is supported).")
    group.add_argument("--text-encoder-precision-2", type=str, default="fp16", choices=PRECISIONS,
                       help="Secondary text encoder dtype.")
    group.add_argument("--text-states-dim-2", type=int, default=768,
                       help="Pooled size of the secondary text encoder (DiT vector_in input).")
    group.add_argument("--tokenizer-2", type=str, default="clipL", choices=SECONDARY_ENCODERS,
                       help="Tokenizer of the secondary text encoder.")
    group.add_argument("--text-len-2", type=int, default=77, help="CLIP max tokens.")


def _add_denoise_schedule_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Denoise schedule args")
    group.add_argument("--denoise-type", type=str, default="flow", choices=["flow"],
                       help="Only flow matching is supported.")
    # Differs: default None = 7.0, or 17.0 with --i2v-mode (the I2V repository's default).
    group.add_argument("--flow-shift", type=float, default=None,
                       help="Time shift of the flow schedule (default 7.0; 17.0 with --i2v-mode).")
    # Differs: on by default. The original defaults to off, which samples in the wrong direction and
    # yields noise unless every command remembers --flow-reverse.
    group.add_argument("--flow-reverse", action=argparse.BooleanOptionalAction, default=True,
                       help="Sample from t=1 to t=0 (default on; --no-flow-reverse restores the "
                            "original's default, which produces noise with the released weights).")
    group.add_argument("--flow-solver", type=str, default="euler", choices=["euler"],
                       help="ODE solver; only euler is supported.")
    group.add_argument("--use-linear-quadratic-schedule", action="store_true",
                       help="No effect (parsed but never read by the original).")
    group.add_argument("--linear-schedule-end", type=int, default=25,
                       help="No effect (parsed but never read by the original).")


def _add_inference_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Inference args")
    # Differs: moves every component, not only the DiT; MODEL_BASE is honoured as its default.
    group.add_argument("--model-base", type=str, default=os.environ.get("MODEL_BASE", "ckpts"),
                       help="Checkpoint root holding hunyuan-video-t2v-720p/, text_encoder/, "
                            "text_encoder_2/ (default: $MODEL_BASE or ckpts).")
    # Differs: default None = <model-base>/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt
    # (or ..._fp8.pt with --use-fp8), so --model-base relocates the DiT too.
    group.add_argument("--dit-weight", type=str, default=None,
                       help="DiT weights file or folder (default: the official file under --model-base).")
    group.add_argument("--model-resolution", type=str, default="540p", choices=["540p", "720p"],
                       help="No effect (one checkpoint serves both).")
    group.add_argument("--load-key", type=str, default="module", choices=["module", "ema"],
                       help="Which weights of the DiT checkpoint dict to load.")
    # Differs: the original kept the DiT resident and streamed the text encoders/VAE leaf by leaf (slow);
    # here it means --offload-mode block unless --offload-mode says otherwise.
    group.add_argument("--use-cpu-offload", action="store_true",
                       help="Keep models on the CPU until needed: same as --offload-mode block.")
    group.add_argument("--offload-mode", type=str, default=None, choices=OFFLOAD_MODES,
                       help="none: all resident; model: each model moves to the GPU for its stage; block: "
                            "model moves + the DiT's blocks streamed with prefetch; sequential: the "
                            "original's leaf-by-leaf offload (slow). Default: block with --use-cpu-offload, "
                            "else none.")
    group.add_argument("--plan-memory", type=float, nargs="?", const=0.0, default=None, metavar="GIB",
                       help="Print the estimated peak GPU memory of this command (and, given GIB, which "
                            "flag combinations fit a card of that size), then exit without loading models.")
    group.add_argument("--batch-size", type=int, default=1, help="Number of seed groups per prompt.")
    group.add_argument("--infer-steps", type=int, default=50, help="Number of denoising steps.")
    group.add_argument("--disable-autocast", action="store_true",
                       help="Run without autocast (weights and activations in their stored dtypes).")
    group.add_argument("--save-path", type=str, default="./results", help="Output directory.")
    group.add_argument("--save-path-suffix", type=str, default="",
                       help="If set, outputs go to <save-path>_<suffix>.")
    group.add_argument("--name-suffix", type=str, default="",
                       help="No effect (parsed but never read by the original).")
    group.add_argument("--num-videos", type=int, default=1, help="Videos per prompt (seeds seed, seed+1, ...).")
    # Differs: one value means a square video (the original crashes on one value).
    group.add_argument("--video-size", type=int, nargs="+", default=(720, 1280),
                       help="Video size: height width (one value: square). Rounded up to multiples of 16.")
    group.add_argument("--video-length", type=int, default=129, help="Frames: 1 or 4k+1.")
    group.add_argument("--prompt", type=str, default=None, help="Prompt for sampling.")
    group.add_argument("--seed-type", type=str, default="auto", choices=["file", "random", "fixed", "auto"],
                       help="No effect (parsed but never read by the original).")
    group.add_argument("--seed", type=int, default=None,
                       help="Seed of the first video (default: drawn once, logged and saved).")
    group.add_argument("--neg-prompt", type=str, default=None,
                       help="Negative prompt for --cfg-scale > 1 (default: the original's).")
    group.add_argument("--cfg-scale", type=float, default=1.0,
                       help="Classifier-free guidance scale; > 1 runs a negative-prompt branch.")
    group.add_argument("--embedded-cfg-scale", type=float, default=6.0,
                       help="Distilled guidance strength fed to the DiT.")
    group.add_argument("--use-fp8", action="store_true",
                       help="Load the fp8 DiT weights (*_fp8.pt with its *_fp8_map.pt).")
    group.add_argument("--reproduce", action="store_true",
                       help="No effect (the original only set an unused flag).")
    # Ours.
    group.add_argument("--prompt-file", type=str, default=None,
                       help="Text file with one prompt per line; models are loaded once for all.")
    group.add_argument("--attn-backend", type=str, default="auto", choices=ATTENTION_BACKENDS,
                       help="Attention kernel: auto (GPU: fa3 > flash > sdpa), fa3 (Hopper, flash-attn 3), "
                            "flash (flash-attn 2), sage (SageAttention), sdpa, vanilla (reference).")
    group.add_argument("--crf", type=int, default=17,
                       help="H.264 quality (0 = lossless, 17 ~ visually lossless, 23 = ffmpeg default).")
    group.add_argument("--save-latents", action="store_true",
                       help="Also save the final latents (.safetensors) to decode again later.")
    group.add_argument("--decode-latents", type=str, default=None,
                       help="Decode a saved latents file to mp4 instead of sampling.")


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Parallel args")
    # Differs: default None, not 1: with neither degree given, torchrun's process count is split
    # automatically (1 x 1 in one process, as before); one degree given leaves the other at 1.
    group.add_argument("--ulysses-degree", type=int, default=None,
                       help="Ulysses sequence-parallel degree (default: chosen from the process count).")
    # Differs: the original's help text says "Ulysses degree".
    group.add_argument("--ring-degree", type=int, default=None,
                       help="Ring-attention sequence-parallel degree (default: chosen from the process "
                            "count).")


def _add_multigpu_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Multi-GPU args (torchrun)")
    group.add_argument("--cfg-parallel", action="store_true",
                       help="With --cfg-scale > 1: half of the processes denoise the negative prompt, half "
                            "the positive; velocities are combined after each step (2 x U x R processes).")
    group.add_argument("--shard-weights", action="store_true",
                       help="Shard the DiT's weights over all processes (PyTorch FSDP2): "
                            "each GPU holds ~1/N of them and gathers a block just before it runs.")


def _add_rewrite_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Prompt rewrite args (see README.md, 'Prompt rewrite')")
    group.add_argument("--prompt-rewrite", type=str, default=None, choices=REWRITE_MODES,
                       help="Rewrite each prompt before encoding, as the paper does: normal (clean English "
                            "caption) or master (adds visual and aesthetic detail). Default: off.")
    group.add_argument("--rewrite-endpoint", type=str, default=None, metavar="URL",
                       help="OpenAI-compatible server (e.g. http://localhost:8000/v1) to rewrite with; API "
                            f"key from ${API_KEY_ENV_VARS[0]} or ${API_KEY_ENV_VARS[1]}. Default: the "
                            "loaded LLM text encoder.")
    group.add_argument("--rewrite-model", type=str, default=None, metavar="NAME",
                       help="Model name the --rewrite-endpoint server serves.")
    group.add_argument("--rewrite-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="Seconds to wait for the rewrite server per try (default 60).")
    group.add_argument("--rewrite-retries", type=int, default=2,
                       help="Extra tries (1 s, 2 s, 4 s ... apart) when the server is unreachable, times out "
                            "or answers 429/5xx (default 2).")
    group.add_argument("--rewrite-max-tokens", type=int, default=None,
                       help="Longest rewrite in tokens (default: the server's limit; 256 with the local "
                            "LLM).")
    group.add_argument("--rewrite-fallback", action="store_true",
                       help="If rewriting fails, warn and continue with the original prompt (default: "
                            "exit 2).")


def rewrite_validation_errors(args: argparse.Namespace) -> list[str]:
    """Problems with the --prompt-rewrite / --rewrite-* flags."""
    errors = []
    if args.prompt_rewrite is None:
        given = [name for name in ("rewrite_endpoint", "rewrite_model", "rewrite_max_tokens")
                 if getattr(args, name) is not None] + (["rewrite_fallback"] if args.rewrite_fallback else [])
        if given:
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in given)
            errors.append(f"{flags} need --prompt-rewrite normal or --prompt-rewrite master")
        return errors
    endpoint = args.rewrite_endpoint
    if endpoint is not None and not endpoint.strip().lower().startswith(("http://", "https://")):
        errors.append(f"--rewrite-endpoint must be an http:// or https:// URL, got {endpoint!r}")
    if endpoint is not None and not (args.rewrite_model or "").strip():
        errors.append("--rewrite-endpoint needs --rewrite-model NAME (the model the server serves)")
    if endpoint is None and args.rewrite_model is not None:
        errors.append("--rewrite-model needs --rewrite-endpoint URL (without one the loaded LLM rewrites)")
    if not args.rewrite_timeout > 0:
        errors.append(f"--rewrite-timeout must be > 0 seconds, got {args.rewrite_timeout}")
    if args.rewrite_retries < 0:
        errors.append(f"--rewrite-retries must be >= 0, got {args.rewrite_retries}")
    if args.rewrite_max_tokens is not None and args.rewrite_max_tokens < 1:
        errors.append(f"--rewrite-max-tokens must be >= 1, got {args.rewrite_max_tokens}")
    return errors


def rewrite_config_from_args(args: argparse.Namespace) -> RewriteConfig:
    """The rewrite settings (mode None: off); the API key comes from the environment only, never a flag."""
    key_env = next((name for name in API_KEY_ENV_VARS if os.environ.get(name, "").strip()), None)
    return RewriteConfig(
        mode=args.prompt_rewrite, endpoint=args.rewrite_endpoint.strip() if args.rewrite_endpoint else None,
        model=args.rewrite_model.strip() if args.rewrite_model else None, timeout_s=args.rewrite_timeout,
        retries=args.rewrite_retries, max_tokens=args.rewrite_max_tokens, fallback=args.rewrite_fallback,
        api_key_env=key_env if args.rewrite_endpoint else None,
        api_key=os.environ[key_env].strip() if key_env and args.rewrite_endpoint else None,
    )


def _add_cache_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Step cache args (skip the DiT blocks on some steps; off by default)")
    group.add_argument("--cache", type=str, default="none", choices=CACHE_POLICIES,
                       help="Step cache: magcache (precomputed ratios, no per-step sync), teacache "
                            "(modulated-input change), fbcache (first-block residual change); none = exact.")
    thresholds = ", ".join(f"{k} {v}" for k, v in DEFAULT_THRESHOLDS.items())
    group.add_argument("--cache-threshold", type=float, default=None,
                       help=f"Reuse threshold, higher = more reuse (defaults: {thresholds}); 0 = never "
                            "reuse.")
    group.add_argument("--cache-max-skip", type=int, default=None, metavar="K",
                       help=f"magcache: at most K consecutive reused steps (default {DEFAULT_MAX_SKIP}).")
    group.add_argument("--cache-retention", type=float, default=None,
                       help=f"magcache: this fraction of the first steps always computes (default "
                            f"{DEFAULT_RETENTION}).")
    group.add_argument("--cache-calibrate", type=str, nargs="?", const="", default=None, metavar="FILE",
                       help="Compute every step and log MagCache's magnitude ratios for this size and step "
                            "count (and write them as JSON to FILE, for --cache-ratios).")
    group.add_argument("--cache-ratios", type=str, default=None, metavar="FILE",
                       help="magcache: calibrated ratios (JSON from --cache-calibrate FILE) instead of the "
                            "nearest published table.")


def _add_lora_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA args")
    group.add_argument("--lora", type=str, action="append", default=None, metavar="PATH[:SCALE]",
                       help="A LoRA .safetensors file (diffusers, original or kohya keys) applied to the DiT; "
                            "repeat for several. PATH:SCALE sets its scale (default 1.0).")
    group.add_argument("--lora-scale", type=float, action="append", default=None, metavar="S",
                       help="Scale of the LoRAs, one per --lora in the same order (default 1.0 each).")
    group.add_argument("--lora-ignore-alpha", action="store_true",
                       help="Scale the LoRAs by --lora-scale alone, ignoring their stored alpha (as "
                            "HunyuanVideo-I2V does for its effect LoRAs).")


def split_lora_arg(text: str) -> tuple[str, float | None]:
    """'PATH:SCALE' -> (PATH, SCALE); a PATH without a numeric ':SCALE' tail -> (PATH, None)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, None


def lora_specs(args: argparse.Namespace) -> tuple[tuple[LoraSpec, ...], list[str]]:
    """The --lora / --lora-scale flags as LoraSpecs, and the problems with them (one line each)."""
    paths, scales = list(args.lora or []), args.lora_scale or []
    # The I2V repository's --use-lora --lora-path: one more --lora, with alpha ignored like its loader.
    own_flags = len(paths)
    if getattr(args, "use_lora", False) and getattr(args, "lora_path", None):
        paths.append(args.lora_path)
    errors, specs = [], []
    if len(scales) > len(paths):
        errors.append(f"--lora-scale given {len(scales)} times but --lora {len(paths)} times: give at most one "
                      "--lora-scale per --lora")
    for index, text in enumerate(paths):
        path, scale = split_lora_arg(text)
        if scale is not None and index < len(scales):
            errors.append(f"--lora {text} has a scale and also gets --lora-scale {scales[index]}: give one")
        scale = scale if scale is not None else (scales[index] if index < len(scales) else 1.0)
        if not math.isfinite(scale):
            errors.append(f"--lora {path}: the scale must be a finite number, got {scale}")
        suffix = Path(path).suffix.lower()
        if suffix in (".pt", ".pth", ".ckpt", ".bin", ".pkl"):
            errors.append(f"--lora {path}: {suffix} files are pickles, which can run code when loaded; "
                          "use the .safetensors version of the LoRA")
        elif not Path(path).is_file():
            errors.append(f"--lora {path}: no such file")
        specs.append(LoraSpec(Path(path), scale, args.lora_ignore_alpha or index >= own_flags))
    return tuple(specs), errors


def _add_speed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Speed args (one device)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the DiT's repeated blocks (one compiled graph per block class; "
                            "the first step pays the compile time, a new video size compiles again).")
    group.add_argument("--compile-mode", type=str, default="default", choices=COMPILE_MODES,
                       help="torch.compile mode for --compile.")
    group.add_argument("--fp8-gemm", action="store_true",
                       help="With --use-fp8: multiply in fp8 (torch._scaled_mm, activations quantised per "
                            "token); needs the CPU or a GPU of compute capability >= 8.9. Near-lossless.")


def _add_memory_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Memory args (issue 20)")
    group.add_argument("--dit-chunk-tokens", type=int, default=None, metavar="N",
                       help="Run the DiT's per-token work (MLPs, projections, final layer) N tokens at a "
                            "time: same maths, a fraction of the activation memory. Default: automatic "
                            "(chunks of at most 8192 tokens); 0: off.")
    group.add_argument("--vae-tile-size", type=int, default=None, metavar="PX",
                       help="VAE decode tile edge in pixels, a multiple of "
                            f"{VAE_TILE_SIZE_MULTIPLE} (default: the VAE's own, 256). Smaller tiles need less "
                            "memory; tiles overlap by 25 %% and are blended as in the original.")
    group.add_argument("--vae-tile-frames", type=int, default=None, metavar="N",
                       help="VAE decode tile length in frames, a multiple of "
                            f"{VAE_TILE_FRAMES_MULTIPLE} (default: the VAE's own, 64).")


def vae_tile_errors(args: argparse.Namespace) -> list[str]:
    """Problems with --vae-tile-size / --vae-tile-frames, one line each."""
    errors = []
    # A tile must overlap its neighbour by 25 % of whole latents, so its latent length must be a multiple
    # of 4: 4 x the 8x spatial / 4x temporal compression of the 884 VAE.
    for flag, value, multiple, unit, ratio in (
        ("--vae-tile-size", args.vae_tile_size, VAE_TILE_SIZE_MULTIPLE, "px", "8x spatial"),
        ("--vae-tile-frames", args.vae_tile_frames, VAE_TILE_FRAMES_MULTIPLE, "frames", "4x temporal"),
    ):
        if value is not None and (value < multiple or value % multiple):
            errors.append(f"{flag} must be a positive multiple of {multiple} {unit} (4 x the VAE's {ratio} "
                          f"compression, so that tiles overlap by whole latents), got {value}")
        elif value is not None and not args.vae_tiling:
            errors.append(f"{flag} sets the decode tiles: drop --no-vae-tiling")
    return errors


def memory_args_errors(args: argparse.Namespace) -> list[str]:
    """Problems with the memory flags, one line each."""
    errors = []
    if args.dit_chunk_tokens is not None and args.dit_chunk_tokens < 0:
        errors.append(f"--dit-chunk-tokens must be 0 (off) or a positive token count, "
                      f"got {args.dit_chunk_tokens}")
    return errors + vae_tile_errors(args)


def _add_reliability_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Safety checks")
    group.add_argument("--no-memory-check", action="store_true",
                       help="Start even when the estimated peak memory exceeds what the device has free.")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the examples' line breaks."""


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(description="HunyuanVideo inference script", epilog=EXAMPLES,
                                 formatter_class=_HelpFormatter)
    _add_network_args(parser)
    _add_extra_models_args(parser)
    _add_denoise_schedule_args(parser)
    _add_inference_args(parser)
    _add_parallel_args(parser)
    _add_multigpu_args(parser)
    _add_rewrite_args(parser)
    _add_cache_args(parser)
    _add_lora_args(parser)
    _add_speed_args(parser)
    _add_memory_args(parser)
    _add_i2v_args(parser)
    _add_reliability_args(parser)
    return parser


def _add_i2v_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Image-to-video args (HunyuanVideo-I2V)")
    group.add_argument("--i2v-mode", action="store_true",
                       help="Image-to-video: animate --i2v-image-path (needs the HunyuanVideo-I2V weights).")
    group.add_argument("--i2v-image-path", type=str, default=None,
                       help="The reference image (PNG/JPEG/WebP; RGBA and greyscale become RGB).")
    group.add_argument("--i2v-resolution", type=str, default="720p", choices=sorted(I2V_RESOLUTIONS),
                       help="Bucket size; the bucket closest to the image's aspect replaces --video-size.")
    group.add_argument("--i2v-condition-type", type=str, default="token_replace", choices=I2V_CONDITION_TYPES,
                       help="token_replace: the current checkpoint; latent_concat: the first (33-channel) "
                            "one.")
    group.add_argument("--i2v-stability", action="store_true",
                       help="Start from 0.999 noise + 0.001 image latents (the 'stable' recipe, with "
                            "--flow-shift 7).")
    group.add_argument("--i2v-dit-weight", type=str, default=None,
                       help="I2V DiT weights (default: <model-base>/hunyuan-video-i2v-720p/transformers/"
                            "mp_rank_00_model_states.pt).")
    # The I2V repository's LoRA flags, mapped onto --lora with alpha ignored (its effect LoRAs need that).
    group.add_argument("--use-lora", action="store_true", help="I2V repository spelling: apply --lora-path.")
    group.add_argument("--lora-path", type=str, default=None,
                       help="I2V repository spelling of --lora PATH --lora-ignore-alpha (with --use-lora).")


def i2v_flag_errors(args: argparse.Namespace) -> list[str]:
    """Problems with the --i2v-* flags (the image itself is checked when it is loaded)."""
    errors = []
    given = [f for f in ("i2v_image_path", "i2v_dit_weight") if getattr(args, f) is not None]
    if not args.i2v_mode:
        given += ["i2v_stability"] if args.i2v_stability else []
        if given:
            errors.append(f"--{given[0].replace('_', '-')} needs --i2v-mode")
    elif args.i2v_image_path is None:
        errors.append("--i2v-mode needs --i2v-image-path IMAGE (the first frame to animate)")
    elif not Path(args.i2v_image_path).is_file():
        errors.append(f"--i2v-image-path {args.i2v_image_path}: no such file")
    if args.use_lora != (args.lora_path is not None):
        errors.append("--use-lora and --lora-path go together (or use --lora PATH --lora-ignore-alpha)")
    if args.i2v_mode and args.prompt is not None and "<image>" in args.prompt:
        errors.append("--prompt must not contain the text <image> in --i2v-mode (the LLaVA's image token)")
    if args.i2v_mode and args.video_length == 1:
        errors.append("--i2v-mode makes videos: --video-length must be 4k+1 > 1 (e.g. 129)")
    return errors


def i2v_config_from_args(args: argparse.Namespace) -> I2VConfig:
    return I2VConfig(
        enabled=args.i2v_mode, image_path=Path(args.i2v_image_path) if args.i2v_image_path else None,
        resolution=args.i2v_resolution, condition_type=args.i2v_condition_type, stability=args.i2v_stability,
    )


def i2v_dit_config(dit: DiTConfig, i2v: I2VConfig, latent_channels: int) -> DiTConfig:
    """The I2V DiT: T2V-cfgdistill + token replace, or the legacy latent_concat checkpoint (33 input
    channels = latents + image latents + mask, and no guidance_in)."""
    if i2v.condition_type == "latent_concat":
        return dit.with_updates(in_channels=2 * latent_channels + 1, guidance_embed=False,
                                image_condition_type="latent_concat")
    return dit.with_updates(image_condition_type="token_replace")


def i2v_model_paths(args: argparse.Namespace) -> dict:
    """ModelConfig fields that move to the I2V checkpoint folders in --i2v-mode (none otherwise)."""
    if not args.i2v_mode:
        return {}
    return {"dit_subdir": I2V_DIT_SUBDIR, "text_encoder_subdir": I2V_TEXT_ENCODER_SUBDIR}


def dit_weight_arg(args: argparse.Namespace) -> Path | None:
    """--dit-weight, or --i2v-dit-weight in --i2v-mode; None: the official file under --model-base."""
    weight = (args.i2v_dit_weight if args.i2v_mode else None) or args.dit_weight
    return Path(weight) if weight else None


def resolve_flow_shift(args: argparse.Namespace) -> float:
    if args.flow_shift is not None:
        return args.flow_shift
    return I2V_FLOW_SHIFT if args.i2v_mode else T2V_FLOW_SHIFT


# --------------------------------------------------------------------------------------------------
# Validation and conversion
# --------------------------------------------------------------------------------------------------


def resolve_offload_mode(args: argparse.Namespace) -> str:
    if args.offload_mode is not None:
        return args.offload_mode
    return "block" if args.use_cpu_offload else "none"


def validation_errors(args: argparse.Namespace) -> list[str]:
    """Every problem with the parsed flags, as one-line messages naming the flag."""
    errors = []
    size = args.video_size
    if len(size) not in (1, 2):
        errors.append(f"--video-size takes 1 or 2 values (height width), got {len(size)}")
    elif min(size) <= 0:
        errors.append(f"--video-size must be positive, got {' '.join(map(str, size))}")
    if args.video_length < 1 or (args.video_length - 1) % 4 != 0:
        errors.append(f"--video-length must be 1 or 4k+1 (e.g. 65, 129), got {args.video_length}")
    positive = ("infer_steps", "num_videos", "batch_size", "ulysses_degree", "ring_degree", "text_len",
                "text_len_2", "rope_theta", "text_states_dim", "text_states_dim_2")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.flow_shift is not None and math.isfinite(args.flow_shift) and args.flow_shift <= 0:
        errors.append(f"--flow-shift must be > 0, got {args.flow_shift}")
    if args.hidden_state_skip_layer < 0:
        errors.append(f"--hidden-state-skip-layer must be >= 0, got {args.hidden_state_skip_layer}")
    if not 0 <= args.crf <= 51:
        errors.append(f"--crf must be between 0 and 51, got {args.crf}")
    if args.latent_channels != VAE_LATENT_CHANNELS[args.vae]:
        errors.append(f"--latent-channels {args.latent_channels} must match the VAE's "
                      f"{VAE_LATENT_CHANNELS[args.vae]} channels of --vae {args.vae}")
    if args.prompt is not None and args.prompt_file is not None:
        errors.append("--prompt and --prompt-file are mutually exclusive: give one")
    if args.prompt is not None and not args.prompt.strip():
        errors.append("--prompt is empty")
    errors += rewrite_validation_errors(args)
    errors += lora_specs(args)[1] + i2v_flag_errors(args)
    if args.fp8_gemm and not args.use_fp8:
        errors.append("--fp8-gemm multiplies the fp8 weights directly: add --use-fp8")
    # Not for --plan-memory / --decode-latents: they run no attention (a plan may be made on a laptop).
    problem = None
    if args.plan_memory is None and args.decode_latents is None:
        problem = attention_backend_problem(args.attn_backend)
    if problem:
        errors.append(f"--attn-backend {args.attn_backend}: {problem}")
    errors += memory_args_errors(args)
    errors += reliability_errors(args)
    errors += multigpu_errors(args)
    return errors + cache_flag_errors(args)


def multigpu_errors(args: argparse.Namespace) -> list[str]:
    """Problems with the parallel layout and the multi-GPU flags (each rank decides alike)."""
    try:
        env = launch_env()
    except ValueError as exc:
        return [str(exc)]
    errors = parallel_layout_errors(args.ulysses_degree, args.ring_degree, env,
                                    cfg_parallel=args.cfg_parallel)
    if args.cfg_parallel and args.cfg_scale <= 1.0:
        errors.append(f"--cfg-parallel splits the two classifier-free-guidance branches, but --cfg-scale "
                      f"{args.cfg_scale:g} runs only one: add --cfg-scale > 1 or drop --cfg-parallel")
    if args.shard_weights and not env.under_launcher:
        errors.append("--shard-weights shards the DiT over the processes of a torchrun launch; one process "
                      "has nothing to share it with: launch with torchrun --nproc_per_node=N or drop it")
    if args.shard_weights and resolve_offload_mode(args) in ("block", "sequential"):
        errors.append(f"--shard-weights keeps each GPU's share of the DiT resident, which --offload-mode "
                      f"{resolve_offload_mode(args)} (or --use-cpu-offload) contradicts: use --offload-mode "
                      f"model (text encoders and VAE loaded per stage) or none")
    together = [flag for flag, on in (("--lora", args.lora), ("--compile", args.compile),
                                      ("--fp8-gemm", args.fp8_gemm)) if on]
    if args.shard_weights and together:
        errors.append(f"--shard-weights has not been tested with {', '.join(together)} (they change the "
                      f"DiT's layers that FSDP2 shards): drop one of them")
    if args.cfg_parallel and args.cache in ("teacache", "fbcache"):
        errors.append(f"--cache {args.cache} decides from each branch's own values, so the two --cfg-parallel "
                      f"halves would skip different steps: use --cache magcache (decided by the step alone) "
                      f"or drop --cfg-parallel")
    return errors


def cache_flag_errors(args: argparse.Namespace) -> list[str]:
    """Problems with the --cache* flags (the ratios file itself is read in `cache_config_from_args`)."""
    errors = []
    if args.cache == "none" and args.cache_calibrate is None:
        given = [f for f in ("cache_threshold", "cache_max_skip", "cache_retention")
                 if getattr(args, f) is not None]
        if given:
            errors.append(f"--{given[0].replace('_', '-')} has no effect without --cache magcache, teacache "
                          "or fbcache")
    if args.cache != "magcache":
        given = [f for f in ("cache_max_skip", "cache_retention") if getattr(args, f) is not None]
        if given and args.cache != "none":
            errors.append(f"--{given[0].replace('_', '-')} applies to --cache magcache only")
    if args.cache_calibrate and not Path(args.cache_calibrate).resolve().parent.is_dir():
        errors.append(f"--cache-calibrate {args.cache_calibrate}: its folder does not exist")
    if args.cache_calibrate is not None and args.cache_ratios is not None:
        errors.append("--cache-calibrate measures new ratios: drop --cache-ratios")
    return errors + settings_errors(_cache_settings(args))


def _cache_settings(args: argparse.Namespace, ratios: tuple[float, ...] | None = None) -> CacheConfig:
    return CacheConfig(
        policy=args.cache, threshold=args.cache_threshold,
        max_skip=DEFAULT_MAX_SKIP if args.cache_max_skip is None else args.cache_max_skip,
        retention=DEFAULT_RETENTION if args.cache_retention is None else args.cache_retention,
        calibrate=args.cache_calibrate is not None, calibrate_path=args.cache_calibrate or None,
        ratios=ratios if ratios is not None else (() if args.cache_ratios is not None else None),
        ratios_source=args.cache_ratios,
    )


def cache_config_from_args(args: argparse.Namespace) -> CacheConfig:
    """The step-cache settings; reads --cache-ratios (ValueError, one line, when it is not usable)."""
    ratios = load_ratios_file(args.cache_ratios) if args.cache_ratios is not None else None
    return _cache_settings(args, ratios)


def reliability_errors(args: argparse.Namespace) -> list[str]:
    """Values no run can use: non-finite numbers, sizes and counts beyond the bounds, seeds out of range."""
    errors = []
    for name in ("cfg_scale", "embedded_cfg_scale", "flow_shift"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):  # --flow-shift None: 7.0 or 17.0 (i2v)
            errors.append(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if len(args.video_size) in (1, 2) and max(args.video_size) > MAX_VIDEO_SIDE:
        errors.append(f"--video-size must be at most {MAX_VIDEO_SIDE} pixels a side (the model was trained "
                      f"up to 720x1280), got {' '.join(map(str, args.video_size))}")
    if args.video_length > MAX_VIDEO_LENGTH:
        errors.append(f"--video-length must be at most {MAX_VIDEO_LENGTH} frames (trained: 129), "
                      f"got {args.video_length}")
    if args.infer_steps > MAX_INFER_STEPS:
        errors.append(f"--infer-steps must be at most {MAX_INFER_STEPS} (the schedule has 1000 timesteps), "
                      f"got {args.infer_steps}")
    videos = args.num_videos * args.batch_size
    if videos > MAX_VIDEOS_PER_PROMPT:
        errors.append(f"--num-videos x --batch-size must be at most {MAX_VIDEOS_PER_PROMPT} videos per "
                      f"prompt, got {args.num_videos} x {args.batch_size}; run several commands instead")
    if args.seed is not None and not 0 <= args.seed <= SEED_LIMIT - max(videos, 1):
        errors.append(f"--seed must be in [0, 2**63 - {max(videos, 1)}] so that the seeds of all "
                      f"{max(videos, 1)} video(s) (seed, seed+1, ...) fit 63 bits, got {args.seed}; omit "
                      "--seed for a random one")
    if not args.save_path.strip():
        errors.append("--save-path is empty: give an output directory (default ./results)")
    return errors


def video_hw(video_size: list[int] | tuple[int, ...]) -> tuple[int, int]:
    return (video_size[0], video_size[0]) if len(video_size) == 1 else (video_size[0], video_size[1])


def read_prompt_file(path: str) -> tuple[str, ...]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"--prompt-file {path}: cannot read it ({exc.strerror})") from exc
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 BOM (Windows Notepad) is fine
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # UTF-16 text decodes to NUL-ridden garbage or not at all
        raise ValueError(f"--prompt-file {path}: not a UTF-8 text file (binary or UTF-16?); save it as UTF-8 "
                         "with one prompt per line")
    lines = text.splitlines()
    prompts = tuple(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))
    if not prompts:
        raise ValueError(f"--prompt-file {path}: no prompts in it (one prompt per line)")
    return prompts


def configs_from_args(args: argparse.Namespace) -> Configs:
    """Turn a validated namespace into the frozen configs the library uses."""
    dit = HUNYUAN_VIDEO_CONFIG[args.model].with_updates(
        in_channels=args.latent_channels, out_channels=args.latent_channels,
        rope_theta=float(args.rope_theta), text_states_dim=args.text_states_dim,
        text_states_dim_2=args.text_states_dim_2,
    )
    i2v = i2v_config_from_args(args)
    if i2v.enabled:
        dit = i2v_dit_config(dit, i2v, args.latent_channels)
    model = ModelConfig(
        model=args.model, dit=dit, precision=args.precision, model_base=Path(args.model_base),
        dit_weight=dit_weight_arg(args), load_key=args.load_key,
        use_fp8=args.use_fp8, attn_backend=args.attn_backend, vae=args.vae,
        vae_precision=args.vae_precision, vae_tiling=args.vae_tiling, text_encoder=args.text_encoder,
        text_encoder_precision=args.text_encoder_precision, text_len=args.text_len,
        tokenizer=args.tokenizer, prompt_template=args.prompt_template,
        prompt_template_video=args.prompt_template_video,
        hidden_state_skip_layer=args.hidden_state_skip_layer, apply_final_norm=args.apply_final_norm,
        text_encoder_2=args.text_encoder_2, text_encoder_precision_2=args.text_encoder_precision_2,
        tokenizer_2=args.tokenizer_2, text_len_2=args.text_len_2, loras=lora_specs(args)[0],
        compile=args.compile, compile_mode=args.compile_mode, fp8_gemm=args.fp8_gemm,
        dit_chunk_tokens=args.dit_chunk_tokens, vae_tile_size=args.vae_tile_size,
        vae_tile_frames=args.vae_tile_frames, **i2v_model_paths(args),
    )
    if args.prompt_file is not None:
        prompts = read_prompt_file(args.prompt_file)
    else:
        prompts = (args.prompt.strip(),) if args.prompt is not None else ()
    height, width = video_hw(args.video_size)
    sampling = SamplingConfig(
        prompts=prompts, neg_prompt=args.neg_prompt, height=height, width=width,
        video_length=args.video_length, infer_steps=args.infer_steps, seed=args.seed,
        cfg_scale=args.cfg_scale, embedded_cfg_scale=args.embedded_cfg_scale,
        flow_shift=resolve_flow_shift(args),
        flow_reverse=args.flow_reverse, flow_solver=args.flow_solver, denoise_type=args.denoise_type,
        num_videos=args.num_videos, batch_size=args.batch_size,
    )
    save_path = f"{args.save_path}_{args.save_path_suffix}" if args.save_path_suffix else args.save_path
    env = launch_env()
    runtime = RuntimeConfig(
        save_path=Path(save_path), disable_autocast=args.disable_autocast,
        offload_mode=resolve_offload_mode(args),
        plan_memory=args.plan_memory, ulysses_degree=args.ulysses_degree,
        ring_degree=args.ring_degree, crf=args.crf, save_latents=args.save_latents,
        decode_latents=Path(args.decode_latents) if args.decode_latents else None,
        rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
        memory_check=not args.no_memory_check,
        cfg_parallel=args.cfg_parallel, shard_weights=args.shard_weights,
        local_world_size=env.local_world_size,
    )
    if runtime.auto_layout and not env.under_launcher:  # one process: 1 x 1, recorded as before
        runtime = dataclasses.replace(runtime, ulysses_degree=1, ring_degree=1)
    return Configs(model=model, sampling=sampling, runtime=runtime, rewrite=rewrite_config_from_args(args),
                   cache=cache_config_from_args(args), i2v=i2v)


def announce_adjustments(args: argparse.Namespace) -> None:
    """Log what the original changes silently: sizes rounded to 16, flags that have no effect."""
    height, width = video_hw(args.video_size)
    if height % 16 or width % 16:
        aligned = (-(-height // 16) * 16, -(-width // 16) * 16)
        logger.warning("--video-size %dx%d is not a multiple of 16; it will be rounded up to %dx%d",
                       height, width, *aligned)
    if args.neg_prompt is not None and not args.cfg_scale > 1.0:
        logger.warning("--neg-prompt has no effect without --cfg-scale > 1 (got %g): the negative branch "
                       "only runs with classifier-free guidance", args.cfg_scale)
    defaults = build_parser().parse_args([])
    if args.i2v_mode:
        if tuple(args.video_size) != tuple(defaults.video_size):
            logger.warning("--video-size is replaced in --i2v-mode by the --i2v-resolution %s bucket closest "
                           "to the image's aspect ratio", args.i2v_resolution)
    for name in NO_EFFECT_FLAGS:
        if getattr(args, name) != getattr(defaults, name):
            logger.warning("--%s has no effect (kept for compatibility with the original)",
                           name.replace("_", "-"))


def parse_args(argv: list[str] | None = None, *, require_prompt: bool = False) -> Configs:
    """Parse and validate the command line; bad values exit with status 2 and a one-line message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = validation_errors(args)
    nothing_to_sample = args.decode_latents is not None or args.plan_memory is not None
    if require_prompt and args.prompt is None and args.prompt_file is None and not nothing_to_sample:
        errors.append("--prompt (or --prompt-file) is required")
    if errors:
        parser.error("; ".join(errors))
    if _reports_errors():  # once per node under torchrun
        announce_adjustments(args)
    try:
        return configs_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    raise AssertionError("unreachable")  # parser.error exits


# --------------------------------------------------------------------------------------------------
# Server (gradio_server.py): the sampling flags above are the defaults of every job
# --------------------------------------------------------------------------------------------------

SERVER_TOKEN_ENV = "HYVIDEO_SERVER_TOKEN"  # bearer token for /v1 and the page's login; never a flag
DEFAULT_SERVER_NAME = "127.0.0.1"  # Differs: the original binds 0.0.0.0 (every interface, no auth)
DEFAULT_SERVER_PORT = 8081


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; larger requests get a 4xx answer, never a job."""

    max_steps: int = 100
    max_side: int = 1280  # pixels, height and width each
    max_frames: int = 129
    max_videos: int = 4  # videos per job
    max_queue: int = 32  # jobs queued or running at once
    max_prompt_chars: int = 2000


@dataclass(frozen=True)
class ServerConfig:
    """Where the server listens, who may use it, and the limits of a job."""

    host: str
    port: int
    token: str | None  # from $HYVIDEO_SERVER_TOKEN; None: no authentication
    limits: ServerLimits
    model_base_given: bool  # False: --model-base was left at its default (tiny-tree fallback allowed)


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Server args (gradio_server.py)")
    group.add_argument("--server-name", type=str, default=None,
                       help=f"Interface to bind (default: $SERVER_NAME or {DEFAULT_SERVER_NAME}; 0.0.0.0 "
                            f"exposes the server to the network: set ${SERVER_TOKEN_ENV} then).")
    group.add_argument("--server-port", type=int, default=None,
                       help=f"Port (default: $SERVER_PORT or {DEFAULT_SERVER_PORT}).")
    limits = ServerLimits()
    for name, help_text in (("max_steps", "denoising steps"), ("max_side", "pixels of height or width"),
                            ("max_frames", "frames"), ("max_videos", "videos per job"),
                            ("max_queue", "jobs queued or running at once"),
                            ("max_prompt_chars", "characters of a prompt")):
        group.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(limits, name),
                           help=f"Largest number of {help_text} a request may ask for.")


def build_server_parser() -> argparse.ArgumentParser:
    """The CLI's flags (defaults of every job) plus the server's own."""
    parser = build_parser()
    parser.description = "HunyuanVideo web page and /v1/videos API"
    # Parity: the original's page writes to ./gradio_outputs.
    parser.set_defaults(save_path="./gradio_outputs")
    _add_server_args(parser)
    return parser


def server_validation_errors(args: argparse.Namespace) -> list[str]:
    errors = []
    for name in ("max_steps", "max_side", "max_frames", "max_videos", "max_queue", "max_prompt_chars"):
        if getattr(args, name) < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.server_port is not None and not 0 < args.server_port < 65536:
        errors.append(f"--server-port must be between 1 and 65535, got {args.server_port}")
    return errors


def parse_server_args(argv: list[str] | None = None) -> tuple[Configs, ServerConfig]:
    """Parse gradio_server.py's command line; bad values exit with status 2 and a one-line message."""
    parser = build_server_parser()
    args = parser.parse_args(argv)
    errors = validation_errors(args) + server_validation_errors(args)
    port = args.server_port
    if port is None:
        raw = os.environ.get("SERVER_PORT", "").strip() or str(DEFAULT_SERVER_PORT)
        port = int(raw) if raw.isdigit() else -1
        if not 0 < port < 65536:
            errors.append(f"environment variable SERVER_PORT={raw!r} is not a port number (1-65535)")
    if errors:
        parser.error("; ".join(errors))
    limits = ServerLimits(max_steps=args.max_steps, max_side=args.max_side, max_frames=args.max_frames,
                          max_videos=args.max_videos, max_queue=args.max_queue,
                          max_prompt_chars=args.max_prompt_chars)
    server = ServerConfig(
        host=args.server_name or os.environ.get("SERVER_NAME", "").strip() or DEFAULT_SERVER_NAME,
        port=port, token=os.environ.get(SERVER_TOKEN_ENV, "").strip() or None, limits=limits,
        model_base_given=args.model_base != build_parser().get_default("model_base"),
    )
    try:
        return configs_from_args(args), server
    except ValueError as exc:
        parser.error(str(exc))
    raise AssertionError("unreachable")  # parser.error exits
