"""The original's flag groups: network, extra models (VAE, text encoders), denoise schedule, inference."""

from __future__ import annotations

import argparse
import os

from hyvideo.constants import HUNYUAN_VIDEO_CONFIG, PRECISIONS, PROMPT_TEMPLATE, VAE_TYPES
from hyvideo.lowmem.offload import OFFLOAD_MODES

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
    _add_loading_args(group)
    _add_sampling_args(group)
    _add_own_inference_args(group)


def _add_loading_args(group: argparse._ArgumentGroup) -> None:
    """The original's inference flags for what is loaded, from where, and how it is offloaded."""
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


def _add_sampling_args(group: argparse._ArgumentGroup) -> None:
    """The original's inference flags for what is generated and where it is written."""
    group.add_argument("--batch-size", type=int, default=1, help="Number of seed groups per prompt.")
    group.add_argument("--infer-steps", type=int, default=50, help="Number of denoising steps.")
    group.add_argument("--disable-autocast", action="store_true",
                       help="Run without autocast (weights and activations in their stored dtypes).")
    group.add_argument("--save-path", type=str, default="./results", help="Output directory.")
    group.add_argument("--save-path-suffix", type=str, default="",
                       help="If set, outputs go to <save-path>_<suffix>.")
    group.add_argument("--name-suffix", type=str, default="",
                       help="No effect (parsed but never read by the original).")
    group.add_argument("--num-videos", type=int, default=1,
                       help="Videos per prompt (seeds seed, seed+1, ...).")
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


def _add_own_inference_args(group: argparse._ArgumentGroup) -> None:
    """Inference flags the original does not have."""
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


def resolve_offload_mode(args: argparse.Namespace) -> str:
    if args.offload_mode is not None:
        return args.offload_mode
    return "block" if args.use_cpu_offload else "none"
