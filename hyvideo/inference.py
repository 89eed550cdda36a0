"""Load the four HunyuanVideo components and sample videos with them.

`Inference.from_pretrained` loads the DiT, the causal 3D VAE and both text encoders from the official
checkpoint layout; `HunyuanVideoSampler.predict` turns one prompt into videos with the original's
semantics (seeds, size alignment, negative prompt), fixing what crashed there (several videos per prompt).

Under torchrun (`--ulysses-degree U --ring-degree R`, U x R processes, or no degree: chosen from the process
count) every rank loads every component and calls `predict` with the same arguments; the components share one
`ParallelGroups` (from `init_parallel`): its sequence group splits the DiT's image tokens (and, with
--shard-weights, its weights), all ranks split the VAE's decode tiles, and with --cfg-parallel the two
guidance branches run on two halves of the ranks. Every rank returns the same videos; only the main process should
save them.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from hyvideo.config import DIT_FILE, Configs, ModelConfig, RuntimeConfig
from hyvideo.constants import PRECISION_TO_TYPE, PROMPT_TEMPLATE, DiTConfig
from hyvideo.diffusion import FlowMatchDiscreteScheduler
from hyvideo.diffusion.pipelines import HunyuanVideoPipeline
from hyvideo.parallel import SequenceParallelState, broadcast_seed, check_num_heads
from hyvideo.parallel.groups import default_device
from hyvideo.parallel.layout import (
    ParallelGroups,
    ParallelLayout,
    as_parallel_groups,
    choose_layout,
    given_layout,
    init_parallel_groups,
)
from hyvideo.utils.data_utils import align_to

logger = logging.getLogger(__name__)

CKPTS_HELP = "see ckpts/README.md for the expected tree and how to download the weights"
DIT_CONFIG_FILE = "dit_config.json"  # optional, beside the DiT weights: overrides the --model preset
MAX_RANDOM_SEED = 1_000_000


def require_path(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}: {CKPTS_HELP}")
    return path


def resolve_dit_config(preset: DiTConfig, weight_path: Path) -> DiTConfig:
    """The architecture described beside the weights, else the --model preset.

    Looked for, in order: our `dit_config.json`, then diffusers' own `config.json` (a
    HunyuanVideoTransformer3DModel folder as `save_pretrained` writes it, or its `transformer/` subfolder).
    The log says which was used, and when both exist but disagree, which one won.
    """
    from hyvideo.modules.loading import dit_config_from_diffusers, find_diffusers_dit_config

    folder = weight_path if weight_path.is_dir() else weight_path.parent
    ours, theirs = folder / DIT_CONFIG_FILE, find_diffusers_dit_config(weight_path)
    diffusers_config = None
    if theirs is not None:
        diffusers_config = dit_config_from_diffusers(_read_json(theirs), str(theirs))
    if ours.is_file():
        try:
            config = DiTConfig.from_dict(_read_json(ours))
        except TypeError as exc:  # a wrong value type inside the file
            raise ValueError(f"{ours}: {exc}") from None
        if diffusers_config is not None and diffusers_config != config:
            logger.warning("%s and %s describe different DiT architectures; using %s", ours, theirs, ours)
        logger.info("DiT architecture from %s", ours)
        return config
    if diffusers_config is not None:
        logger.info("DiT architecture from diffusers' %s%s", theirs,
                    "" if diffusers_config == preset else " (differs from the --model preset)")
        return diffusers_config
    return preset


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the DiT config {path}: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"the DiT config {path} is not a JSON object")
    return values


def draw_seed() -> int:
    seed = random.randint(0, MAX_RANDOM_SEED)
    logger.info("No --seed given: drew seed %d", seed)
    return seed


def agree_seed(seed: int | None, parallel: SequenceParallelState | None = None) -> int:
    """`seed`, or a drawn one when None; under torchrun rank 0's value on every rank.

    Parity: the original lets each rank draw its own seed when --seed is unset (different noise per rank,
    a broken video); here all ranks use the seed that rank 0 drew (and logged).
    """
    local = draw_seed() if seed is None else seed
    return local if parallel is None or not parallel.enabled else broadcast_seed(local, parallel)


def init_parallel(runtime: RuntimeConfig, layout: ParallelLayout | None = None) -> ParallelGroups:
    """The process group and the groups of `layout` (default: the degrees in `runtime`, 1 x world when
    they are left to be chosen, which suits work without the DiT such as decoding saved latents).

    Device: the accelerator with index LOCAL_RANK when there is one, else the CPU (gloo).
    """
    if layout is None:
        cfg = runtime.cfg_parallel
        ring = runtime.world_size // (2 if cfg else 1) if runtime.auto_layout else runtime.ring_degree or 1
        layout = given_layout(runtime.ulysses_degree or 1, ring, cfg_parallel=cfg)
    return init_parallel_groups(layout, rank=runtime.rank, world_size=runtime.world_size,
                                local_rank=runtime.local_rank)


def check_parallel_layout(configs: Configs) -> ParallelLayout:
    """The layout this launch runs: chosen from the world size and the DiT's head count when no degree was
    given, else the given one, checked (before any collective): Ulysses must divide the head count.

    The head count comes from the DiT that will be loaded (its dit_config.json, else the --model preset),
    so every rank reaches the same verdict from the same files.
    """
    runtime = configs.runtime
    if runtime.auto_layout:
        if runtime.world_size == 1:
            return given_layout(1, 1)
        # Logged with its reason once the groups exist (init_parallel).
        return choose_layout(runtime.world_size, _dit_heads(configs.model),
                             ranks_per_node=runtime.local_world_size, cfg_parallel=runtime.cfg_parallel)
    ulysses = runtime.ulysses_degree or 1
    layout = given_layout(ulysses, runtime.ring_degree or 1, cfg_parallel=runtime.cfg_parallel)
    if ulysses > 1:
        try:
            check_num_heads(_dit_heads(configs.model), ulysses)
        except ValueError as exc:
            raise ValueError(f"--ulysses-degree {ulysses}: {exc}") from None
    return layout


def _dit_heads(cfg: ModelConfig) -> int:
    path = require_path(dit_weight_file(cfg), "DiT weights (--dit-weight)")
    return resolve_dit_config(cfg.dit, path).heads_num


@dataclass
class PredictOutput:
    samples: torch.Tensor | None  # (N, 3, T, H, W) float32 in [0, 1]
    latents: torch.Tensor  # (N, C, T', H/8, W/8) float32
    seeds: list[int]
    prompt: str
    negative_prompt: str
    size: tuple[int, int, int]  # (height, width, frames) actually generated
    timings: dict[str, float] = field(default_factory=dict)
    step_cache: dict | None = None  # with --cache / --cache-calibrate: policy, parameters, computed steps
    loras: list[dict] = field(default_factory=list)  # the applied LoRAs (LoraStack.records())


class Inference:
    """Holds the loaded components; `from_pretrained` builds them from a checkpoint tree."""

    def __init__(self, *, transformer, vae, text_encoder, text_encoder_2, model_config: ModelConfig,
                 device: torch.device, parallel: SequenceParallelState | ParallelGroups | None = None,
                 offload=None):
        self.transformer, self.vae = transformer, vae
        self.offload = offload  # hyvideo.lowmem.offload.OffloadPlan, or None when everything is resident
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.model_config, self.device = model_config, device
        self.groups = as_parallel_groups(parallel) if parallel is not None else None
        # All ranks (seed, initial noise, VAE tiles); None in one process.
        self.parallel = self.groups.world if self.groups is not None and self.groups.enabled else None

    @property
    def is_main_process(self) -> bool:
        """True on the rank that should log and save (always in a single process)."""
        return self.parallel is None or self.parallel.is_main

    @classmethod
    def from_pretrained(cls, configs: Configs, *, device: torch.device | None = None,
                        parallel: SequenceParallelState | ParallelGroups | None = None, **kwargs):
        """Load every component from `configs.model.model_base` (or the paths it overrides).

        `parallel`: the parallel groups (`init_parallel(configs.runtime, check_parallel_layout(configs))`);
        when None under torchrun, they are created here. Their device is the default device.
        With --shard-weights each rank loads only its share of the DiT's weights (see
        hyvideo/parallel/weight_sharding.py), straight onto `device`.
        """
        cfg, runtime = configs.model, configs.runtime
        if parallel is None and runtime.world_size > 1:
            parallel = init_parallel(runtime, check_parallel_layout(configs))
        if device is None:
            device = parallel.device if parallel is not None else default_device(local_rank=None)
        offload_mode = runtime.offload_mode
        # Under offload everything is loaded to the CPU first: a small card never holds all four models.
        load_device = device if offload_mode == "none" else torch.device("cpu")
        logger.info("Loading models from %s onto %s (offload: %s)", cfg.model_base, load_device, offload_mode)
        require_path(cfg.model_base, "checkpoint root (--model-base)")
        started = time.perf_counter()
        shard_group = as_parallel_groups(parallel).world if runtime.shard_weights and parallel else None
        components = {
            "transformer": load_transformer(cfg, device if shard_group else load_device,
                                            shard_over=shard_group),
            "vae": load_vae_component(cfg, load_device),
            **load_text_encoders(cfg, load_device),
        }
        if cfg.fp8_gemm:  # before offload: the offloader tracks the modules that own each tensor
            from hyvideo.modules.fp8_gemm import enable_fp8_gemm

            enable_fp8_gemm(components["transformer"], device)
        offload = None
        if offload_mode != "none":
            from hyvideo.lowmem.offload import apply_offload

            # A sharded DiT stays where its shards are; only the text encoders and the VAE move per stage.
            staged = {**components, "transformer": None} if shard_group else components
            offload = apply_offload(staged, mode=offload_mode, device=device)
        logger.info("Models loaded in %.1f s", time.perf_counter() - started)
        return cls(**components, model_config=cfg, device=device, parallel=parallel, offload=offload, **kwargs)


def dit_weight_file(cfg: ModelConfig) -> Path:
    """The DiT weights to load. With --use-fp8, no --dit-weight and no official fp8 file, the bf16 file:
    it is quantised at load (users need not download the fp8 pair too)."""
    path = cfg.dit_weight_path
    if cfg.use_fp8 and cfg.dit_weight is None and not path.exists():
        bf16 = path.with_name(DIT_FILE)
        if bf16.exists():
            return bf16
    return path


def load_transformer(
    cfg: ModelConfig, device: torch.device, *, shard_over: SequenceParallelState | None = None
):
    """The DiT on `device`; with `shard_over` (--shard-weights) each rank holds only its FSDP2 shards."""
    from hyvideo.modules import load_dit
    from hyvideo.modules.fp8_optimization import load_fp8_dit

    path = require_path(dit_weight_file(cfg), "DiT weights (--dit-weight)")
    if path != cfg.dit_weight_path:  # logged here only: the layout and memory checks ask for the path too
        logger.info("--use-fp8: %s not found; quantising %s at load", cfg.dit_weight_path.name, path)
    dit_config = resolve_dit_config(cfg.dit, path)
    kwargs = dict(load_key=cfg.load_key, dtype=PRECISION_TO_TYPE[cfg.precision], device=device,
                  attention_backend=cfg.attn_backend)
    if shard_over is not None:
        from hyvideo.parallel.weight_sharding import load_sharded_dit

        model = load_sharded_dit(dit_config, path, shard_over, use_fp8=cfg.use_fp8, **kwargs)
    else:
        loader = load_fp8_dit if cfg.use_fp8 else load_dit
        model = loader(dit_config, path, **kwargs)
    model.set_chunk_tokens(cfg.dit_chunk_tokens)
    return model


def prepare_loras(cfg: ModelConfig) -> list[tuple]:
    """Read and check every --lora file against the DiT's layer names and shapes, before loading anything.

    The DiT that will be loaded is built on the meta device (no memory), so a LoRA for another model or size
    fails in seconds. Returns [(LoraWeights, scale)] for `HunyuanVideoSampler.add_lora`.
    """
    if not cfg.loras:
        return []
    from hyvideo.modules import HYVideoDiffusionTransformer
    from hyvideo.modules.lora_files import read_lora

    dit_config = resolve_dit_config(cfg.dit, require_path(cfg.dit_weight_path, "DiT weights (--dit-weight)"))
    meta_dit = HYVideoDiffusionTransformer(dit_config, device="meta")
    names: set[str] = set()
    prepared = []
    for spec in cfg.loras:
        name, index = spec.path.stem, 2
        while name in names:  # the same file name twice: keep both, told apart by a suffix
            name, index = f"{spec.path.stem}_{index}", index + 1
        names.add(name)
        prepared.append((read_lora(spec.path, meta_dit, name=name, ignore_alpha=spec.ignore_alpha), spec.scale))
    return prepared


def i2v_negative_prompt(negative: str | None) -> str:
    """Parity: the I2V repository's own default negative prompt when none is given."""
    from hyvideo.i2v.llava_layout import NEGATIVE_PROMPT_I2V

    return negative.strip() if negative and negative.strip() else NEGATIVE_PROMPT_I2V


def drop_leading_frames(videos: torch.Tensor, condition_type: str | None) -> torch.Tensor:
    """Parity: the latent_concat release drops the first 4 decoded frames; token_replace keeps all."""
    from hyvideo.i2v.settings import LATENT_CONCAT_DROPPED_FRAMES

    return videos[:, :, LATENT_CONCAT_DROPPED_FRAMES:] if condition_type == "latent_concat" else videos


def load_vae_component(cfg: ModelConfig, device: torch.device):
    from hyvideo.vae import load_vae

    path = require_path(cfg.vae_path, "VAE folder")
    vae = load_vae(path, dtype=PRECISION_TO_TYPE[cfg.vae_precision], device=device)
    if cfg.vae_tile_size is not None or cfg.vae_tile_frames is not None:
        default = vae.tile_geometry  # the config.json's sample_size / sample_tsize
        geometry = replace(
            default, sample_size=cfg.vae_tile_size or default.sample_size,
            sample_tsize=cfg.vae_tile_frames or default.sample_tsize,
        )
        vae.enable_tiling(geometry)  # tiling stays switchable per decode (--no-vae-tiling is refused with these)
        logger.info("VAE decode tiles: %d px / %d frames", geometry.sample_size, geometry.sample_tsize)
    return vae


def load_text_encoders(cfg: ModelConfig, device: torch.device) -> dict:
    from hyvideo.text_encoder import CLIPTextEncoder, TextEncoder

    if cfg.dit.image_condition_type is not None:  # --i2v-mode: the whole LLaVA (text + reference image)
        from hyvideo.i2v.llava import LlavaTextEncoder

        llm = LlavaTextEncoder.from_pretrained(
            require_path(cfg.text_encoder_path, "I2V LLaVA text encoder folder"),
            dtype=PRECISION_TO_TYPE[cfg.text_encoder_precision], device=device,
            interleave=4 if cfg.dit.image_condition_type == "token_replace" else 2,
            hidden_state_skip_layer=cfg.hidden_state_skip_layer,
        )
    else:
        llm = None
    llm = llm or TextEncoder.from_pretrained(
        require_path(cfg.text_encoder_path, "LLM text encoder folder"),
        dtype=PRECISION_TO_TYPE[cfg.text_encoder_precision], device=device, text_len=cfg.text_len,
        prompt_template=PROMPT_TEMPLATE[cfg.prompt_template],
        prompt_template_video=PROMPT_TEMPLATE[cfg.prompt_template_video],
        hidden_state_skip_layer=cfg.hidden_state_skip_layer, apply_final_norm=cfg.apply_final_norm,
    )
    clip = CLIPTextEncoder.from_pretrained(
        require_path(cfg.text_encoder_2_path, "CLIP text encoder folder"),
        dtype=PRECISION_TO_TYPE[cfg.text_encoder_precision_2], device=device, max_length=cfg.text_len_2,
    )
    return {"text_encoder": llm, "text_encoder_2": clip}


class HunyuanVideoSampler(Inference):
    """Text-to-video sampling with the original's `predict` semantics."""

    def __init__(self, *, use_autocast: bool = True, **components):
        super().__init__(**components)
        cfg = self.model_config
        groups = self.groups
        # Checks U against the head count; the DiT splits its tokens over this rank's sequence group.
        self.transformer.enable_sequence_parallel(groups.sequence if groups is not None else None)
        if cfg.compile:  # last: the model is final (offload hooks, sequence parallelism, fp8 layers)
            from hyvideo.modules.compile import compile_dit_blocks

            compile_dit_blocks(self.transformer, mode=cfg.compile_mode)
        self.pipeline = HunyuanVideoPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            transformer=self.transformer, scheduler=FlowMatchDiscreteScheduler(),
            dit_dtype=PRECISION_TO_TYPE[cfg.precision], vae_dtype=PRECISION_TO_TYPE[cfg.vae_precision],
            use_autocast=use_autocast, parallel=self.parallel, offload=self.offload,
            cfg_parallel=groups.cfg if groups is not None else None,
        )
        self._lora_stack = None

    # -- LoRA (between prompts; the base model is never reloaded) --

    @property
    def lora_stack(self):
        """The LoRAs applied to the DiT (hyvideo.modules.lora.LoraStack), created on first use."""
        if self._lora_stack is None:
            from hyvideo.modules.lora import LoraStack

            self._lora_stack = LoraStack(self.transformer, device=self.device)
        return self._lora_stack

    def load_lora(self, path, scale: float = 1.0, name: str | None = None, *, ignore_alpha: bool = False) -> str:
        """Read a safetensors LoRA (diffusers, original or kohya keys) and apply it at `scale`.

        Args:
            path: the .safetensors file. name: how to refer to it later (default: the file's stem).
            ignore_alpha: use factor 1 instead of alpha / rank (HunyuanVideo-I2V's effect LoRAs).
        Returns:
            The LoRA's name.
        Raises:
            FileNotFoundError / ValueError: see `hyvideo.modules.lora_files.read_lora`; the name is taken.
        """
        from hyvideo.modules.lora_files import read_lora

        weights = read_lora(path, self.transformer, name=name, ignore_alpha=ignore_alpha)
        self.add_lora(weights, scale)
        return weights.name

    def add_lora(self, weights, scale: float = 1.0) -> None:
        """Apply an already read LoRA (`hyvideo.modules.lora_files.LoraWeights`) at `scale`."""
        self.lora_stack.add(weights, scale)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change the scale of a loaded LoRA (0 switches it off exactly, keeping it loaded)."""
        self.lora_stack.set_scale(name, scale)

    def unload_loras(self) -> None:
        """Remove every LoRA: the DiT's weights are back to their exact original values."""
        if self._lora_stack is not None:
            self._lora_stack.clear()

    # -- Freeing the text encoders (after a run's last prompt) --

    def release_text_encoders(self) -> int:
        """Free both text encoders for good: the host RAM (under offload) or device memory they hold goes
        back to the DiT and the VAE. Later `predict` calls raise. Returns the bytes of weights released."""
        from hyvideo.lowmem.release import return_freed_memory, weight_bytes

        released = weight_bytes([self.text_encoder, self.text_encoder_2])
        self.text_encoder = self.text_encoder_2 = None
        self.pipeline.register_modules(text_encoder=None, text_encoder_2=None)
        if self.offload is not None:
            self.offload.forget("text_encoder", "text_encoder_2")
        return_freed_memory(self.device)
        logger.info("Text encoders released after the last prompt's encoding: %.2f GiB of weights freed",
                    released / 2**30)
        return released

    def _negative_prompt_record(self, negative: str | None, guidance_scale: float, *, i2v: bool) -> str:
        if guidance_scale <= 1:
            return ""
        return i2v_negative_prompt(negative) if i2v else self.pipeline.resolve_negative_prompt(negative)

    def _i2v_inputs(self, prompt: str, negative: str | None, image, size: tuple[int, int],
                    stability: bool, *, cfg: bool) -> dict:
        """Pipeline arguments for image-to-video: LLaVA + CLIP conditions, and the image latents."""
        from hyvideo.diffusion.pipelines import TextConditions
        from hyvideo.i2v import image_to_tensor, resize_and_center_crop
        from hyvideo.i2v.conditioning import ImageCondition, encode_image_latents

        pipe = self.pipeline
        with pipe.stage("text_encoder", "text_encoder_2"):
            def encode(text: str, picture) -> TextConditions:
                llm = self.text_encoder.encode([text], [picture], device=pipe.device)
                clip = self.text_encoder_2.encode([text], device=pipe.device)
                return TextConditions(llm.hidden_state, llm.attention_mask, clip.pooled_output)

            # Parity: the LLaVA sees the original image file (its own CLIP-336 preprocessing), not the crop;
            # the negative branch sees a black image of the same size.
            cond = encode(prompt, image)
            negative_cond = None
            if cfg:
                from PIL import Image

                negative_cond = encode(i2v_negative_prompt(negative), Image.new("RGB", image.size))
        pixels = image_to_tensor(resize_and_center_crop(image, size))  # (1, 3, 1, H, W)
        with pipe.stage("vae"):
            latents = encode_image_latents(self.vae, pixels, vae_dtype=pipe.vae_dtype,
                                           use_autocast=pipe.use_autocast, device=pipe.device)
        condition = ImageCondition(latents, self.transformer.config.image_condition_type, stability)
        return {"prompt_conditions": cond, "negative_conditions": negative_cond, "image_condition": condition}

    def predict(
        self,
        prompt: str,
        *,
        height: int = 720,
        width: int = 1280,
        video_length: int = 129,
        seed: int | None = None,
        negative_prompt: str | None = None,
        infer_steps: int = 50,
        guidance_scale: float = 1.0,
        flow_shift: float = 7.0,
        flow_reverse: bool = True,
        embedded_guidance_scale: float | None = 6.0,
        num_videos_per_prompt: int = 1,
        output_type: str = "pt",
        enable_tiling: bool = True,
        show_progress: bool = True,
        cache=None,
        reference_image=None,
        i2v_stability: bool = False,
        callback=None,
        release_text_encoders: bool = False,
    ) -> PredictOutput:
        """Generate `num_videos_per_prompt` videos for one prompt; video i uses seed `seed + i`.

        Under sequence parallelism call it on every rank with the same arguments: the seed is rank 0's,
        only rank 0 shows the progress bar, and every rank returns the same output. `cache`: step-cache
        settings (hyvideo.diffusion.cache.CacheConfig); None or policy "none" runs every block.
        `reference_image` (I2V, a PIL RGB image; needs an I2V DiT): it is resized and center-cropped to
        height x width (its bucket, see hyvideo.i2v.bucket_for_image) and becomes the first frame.
        `callback(step_index, timestep, latents)` runs after every denoising step (progress, cancellation:
        an exception raised there aborts the call before anything is decoded).
        `release_text_encoders`: this is the last prompt; free the text encoders once it is encoded
        (`release_text_encoders()`), before denoising. The video is the same.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: give a text prompt")
        if self.text_encoder is None:
            raise ValueError("the text encoders were released after the last prompt (release_text_encoders): "
                             "load the sampler again to encode more prompts")
        if height <= 0 or width <= 0:
            raise ValueError(f"video size must be positive, got {height}x{width}")
        if video_length < 1 or (video_length - 1) % 4:
            raise ValueError(f"video length must be 1 or 4k+1 frames, got {video_length}")
        target_h, target_w = align_to(height, 16), align_to(width, 16)
        if (target_h, target_w) != (height, width):
            logger.warning("Size %dx%d rounded up to %dx%d (multiples of 16)", height, width, target_h, target_w)
        base_seed = agree_seed(seed, self.parallel)
        seeds = [base_seed + i for i in range(num_videos_per_prompt)]
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        # Parity: no negative prompt without CFG; the original's default negative prompt with CFG.
        negative = (negative_prompt or None) if guidance_scale > 1.0 else None
        self.pipeline.scheduler = FlowMatchDiscreteScheduler(shift=flow_shift, reverse=flow_reverse)
        logger.info("Sampling %d video(s) of %dx%dx%d (HxWxframes), %d steps, seeds %s", len(seeds), target_h,
                    target_w, video_length, infer_steps, seeds)
        started = time.perf_counter()
        i2v = {}
        if reference_image is not None:
            i2v = self._i2v_inputs(prompt.strip(), negative, reference_image, (target_h, target_w),
                                   i2v_stability, cfg=guidance_scale > 1.0)
            if release_text_encoders:  # the I2V prompts are encoded above; the pipeline encodes none
                self.release_text_encoders()
        elif self.transformer.config.image_condition_type is not None:
            raise ValueError("this is an image-to-video DiT: pass a reference image (--i2v-image-path)")
        out = self.pipeline(
            None if i2v else prompt.strip(), **i2v, height=target_h, width=target_w,
            video_length=video_length,
            num_inference_steps=infer_steps, guidance_scale=guidance_scale, negative_prompt=negative,
            embedded_guidance_scale=embedded_guidance_scale, num_videos_per_prompt=len(seeds),
            generator=generators, data_type="video" if video_length > 1 else "image",
            output_type=output_type, enable_tiling=enable_tiling,
            show_progress=show_progress and self.is_main_process, cache=cache,
            callback_on_step_end=callback,
            after_encode=self.release_text_encoders if release_text_encoders and not i2v else None,
        )
        elapsed = time.perf_counter() - started
        if reference_image is not None and out.videos is not None:
            out.videos = drop_leading_frames(out.videos, self.transformer.config.image_condition_type)
        logger.info("Success, time: %.1f s", elapsed)
        return PredictOutput(
            samples=out.videos, latents=out.latents, seeds=seeds, prompt=prompt.strip(),
            negative_prompt=self._negative_prompt_record(negative, guidance_scale,
                                                         i2v=reference_image is not None),
            size=(target_h, target_w, video_length), timings={**out.timings, "total_s": elapsed},
            step_cache=out.step_cache,
            loras=self._lora_stack.records() if self._lora_stack is not None else [],
        )
