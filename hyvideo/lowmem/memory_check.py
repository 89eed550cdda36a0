"""Refuse, before any weight is loaded, a run whose estimated peak memory exceeds what the device has free.

The estimate comes from the memory plan (`_plan_estimate` is the one call into hyvideo.lowmem.memory_plan, so
the planner can change underneath). It is an estimate, so the check only refuses runs that the estimate says
cannot fit, and `--no-memory-check` starts them anyway.

The plan models the released text encoders (LLaVA-Llama-3-8B + CLIP-L) and VAE; it takes the DiT
architecture as a parameter. When the checkpoint tree holds other text encoders or another VAE (the tiny
test trees, for instance), the estimate says nothing about it and the check is skipped with a debug log.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from hyvideo.config import Configs
from hyvideo.constants import DiTConfig

logger = logging.getLogger(__name__)

GIB = 1 << 30
# What the memory plan's fixed terms describe: the released LLM text encoder and VAE.
RELEASED_LLM_SHAPE = {"hidden_size": 4096, "num_hidden_layers": 32}
RELEASED_VAE_CHANNELS = [128, 256, 512, 512]


class MemoryCheckError(ValueError):
    """The run is estimated not to fit the device (a user error: exit 2 with one line)."""


@dataclass(frozen=True)
class MemoryVerdict:
    """The estimated need against what the device offers, in GiB."""

    needed_gib: float
    available_gib: float
    device: str
    stage: str  # the stage at the peak
    biggest_term: str  # the largest term of the estimate, e.g. "DiT activations"
    biggest_gib: float
    hints: tuple[str, ...]  # flags that would shrink the biggest term

    @property
    def fits(self) -> bool:
        return self.needed_gib <= self.available_gib

    def message(self, size: str) -> str:
        return (f"this run ({size}) needs about {self.needed_gib:.1f} GiB at its peak ({self.stage} stage; "
                f"biggest term: {self.biggest_term} {self.biggest_gib:.1f} GiB) but the {self.device} has "
                f"{self.available_gib:.1f} GiB free: try {', '.join(self.hints)} "
                "(or --no-memory-check to start anyway)")


def check_memory_fits(configs: Configs, *, device: torch.device | None = None) -> None:
    """Raise MemoryCheckError when `configs` is estimated not to fit `device` (default: the sampler's)."""
    if not configs.runtime.memory_check:
        return
    verdict = memory_verdict(configs, device=device)
    if verdict is not None and not verdict.fits:
        s = configs.sampling
        raise MemoryCheckError(verdict.message(f"{s.height}x{s.width}x{s.video_length}"))


def memory_verdict(
    configs: Configs, *, device: torch.device | None = None, available_bytes: int | None = None
) -> MemoryVerdict | None:
    """The estimate against the device, or None (with a debug log) when no estimate can be made."""
    if configs.runtime.world_size > 1:
        logger.debug("memory check skipped: the estimate is for one device, this run shards over several")
        return None
    dit_config = _dit_config_to_load(configs)
    if dit_config is None or not describes_released_models(configs.model.vae_path,
                                                           configs.model.text_encoder_path):
        return None
    if device is None:
        from hyvideo.parallel.groups import default_device

        device = default_device(None)
    if available_bytes is None:
        available_bytes = device_free_bytes(device)
    if available_bytes is None:
        logger.debug("memory check skipped: cannot tell how much memory %s has free", device)
        return None
    estimate = _plan_estimate(configs, dit_config)
    needed = estimate.peak_gib
    if device.type == "cpu":  # weights an offload mode parks in host memory are in the same RAM
        needed += getattr(estimate, "host_weights_gib", 0.0)
    term, term_gib = _biggest_term(estimate)
    return MemoryVerdict(
        needed_gib=needed, available_gib=available_bytes / GIB, device=str(device),
        stage=getattr(estimate, "peak_stage", "peak"), biggest_term=term, biggest_gib=term_gib,
        hints=_hints(term, configs, on_cpu=device.type == "cpu"),
    )


def _plan_estimate(configs: Configs, dit_config: DiTConfig):
    """The single call into the memory plan (swap here when the planner's interface changes)."""
    from hyvideo.lowmem.memory_plan import estimate_peak_memory

    cfg, sampling = configs.model, configs.sampling
    return estimate_peak_memory(
        height=sampling.height, width=sampling.width, video_length=sampling.video_length,
        precision=cfg.precision, use_fp8=cfg.use_fp8, offload_mode=configs.runtime.offload_mode,
        cfg_scale=sampling.cfg_scale, vae_tiling=cfg.vae_tiling, text_len=cfg.text_len, dit_config=dit_config,
        batch_size=sampling.num_videos * sampling.batch_size, vae_precision=cfg.vae_precision,
        text_encoder_precision=cfg.text_encoder_precision, dit_chunk_tokens=cfg.dit_chunk_tokens,
        vae_tile_size=cfg.vae_tile_size or 256, vae_tile_frames=cfg.vae_tile_frames or 64,
    )


def _dit_config_to_load(configs: Configs) -> DiTConfig | None:
    """The DiT architecture that loading will build (its config file beside the weights, else the preset)."""
    from hyvideo.inference import dit_weight_file, resolve_dit_config

    path = dit_weight_file(configs.model)
    if not path.exists():
        logger.debug("memory check skipped: no DiT weights at %s (loading will say so)", path)
        return None
    try:
        return resolve_dit_config(configs.model.dit, path)
    except (OSError, ValueError) as exc:
        logger.debug("memory check skipped: cannot read the DiT config (%s)", exc)
        return None


def _read_config(folder: Path) -> dict | None:
    try:
        values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def describes_released_models(vae_folder: Path, text_encoder_folder: Path) -> bool:
    """Whether the VAE and LLM folders hold the released architectures the plan's fixed terms describe."""
    vae, llm = _read_config(vae_folder), _read_config(text_encoder_folder)
    released = (
        vae is not None and vae.get("block_out_channels") == RELEASED_VAE_CHANNELS
        and llm is not None and all(llm.get(k) == v for k, v in RELEASED_LLM_SHAPE.items())
    )
    if not released:
        logger.debug("memory check skipped: %s / %s are not the released VAE and LLM the estimate models",
                     vae_folder, text_encoder_folder)
    return released


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of an accelerator, or MemAvailable of the host for the CPU; None when unknown."""
    if device.type == "cpu":
        return _mem_available_bytes()
    try:
        free, _total = torch.accelerator.get_memory_info(device)
    except AttributeError:  # torch before 2.9: the backend module's own query (torch.<type>.mem_get_info)
        query = getattr(getattr(torch, device.type, None), "mem_get_info", None)
        if query is None:
            return None
        try:
            free, _total = query(device)
        except RuntimeError:
            return None
    except RuntimeError:
        return None
    return int(free)


def _mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


_TERMS = (  # (estimate field, what the message calls it)
    ("activations_reserved_gib", "DiT activations"),
    ("dit_weights_gib", "DiT weights"),
    ("text_encoder_weights_gib", "text encoder weights"),
    ("vae_decode_workspace_gib", "VAE decode workspace"),
    ("vae_weights_gib", "VAE weights"),
)


def _biggest_term(estimate) -> tuple[str, float]:
    terms = [(name, float(getattr(estimate, field))) for field, name in _TERMS if hasattr(estimate, field)]
    if not terms:
        return "peak", float(estimate.peak_gib)
    return max(terms, key=lambda term: term[1])


def _hints(term: str, configs: Configs, *, on_cpu: bool) -> tuple[str, ...]:
    """Flags that shrink `term`, most effective first; offload only helps when there is an accelerator."""
    cfg, sampling = configs.model, configs.sampling
    smaller = "a smaller --video-size / --video-length"
    offload = () if on_cpu or configs.runtime.offload_mode != "none" else ("--use-cpu-offload",)
    if term == "DiT activations":
        hints = (smaller, *(("--cfg-scale 1",) if sampling.cfg_scale > 1 else ()),
                 *(("fewer --num-videos",) if sampling.num_videos * sampling.batch_size > 1 else ()))
    elif term == "DiT weights":
        hints = (*(() if cfg.use_fp8 else ("--use-fp8",)), *offload,
                 *(("--precision bf16",) if cfg.precision == "fp32" else ()))
    elif term == "text encoder weights":
        fp16 = ("--text-encoder-precision fp16",) if cfg.text_encoder_precision == "fp32" else ()
        hints = (*offload, *fp16)
    elif term == "VAE decode workspace":
        tiles = "smaller --vae-tile-size / --vae-tile-frames (--plan-memory GIB picks them)"
        hints = ("--vae-tiling",) if not cfg.vae_tiling else (tiles, smaller)
    else:
        hints = (*offload, smaller)
    return hints or ("a device with more free memory",)
