"""Text-to-video pipeline: encode prompts -> prepare latents -> denoise -> decode."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DiffusionPipeline

from hyvideo.constants import NEGATIVE_PROMPT
from hyvideo.diffusion.cache import CacheConfig, StepCache
from hyvideo.i2v.conditioning import ImageCondition
from hyvideo.lowmem.offload import OffloadPlan
from hyvideo.parallel.groups import SequenceParallelState, broadcast_from_main
from hyvideo.parallel.layout import CfgBranch
from hyvideo.parallel.vae_decode import parallel_vae_decode

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class TextConditions:
    """Prompt embeddings for the DiT: LLM states, their mask, and the CLIP pooled vector."""

    embeds: torch.Tensor  # (B, L_txt, D_llm)
    mask: torch.Tensor  # (B, L_txt), 1 = real token, right padded
    pooled: torch.Tensor  # (B, D_clip)

    def repeat(self, n: int) -> TextConditions:
        # Copies of the same prompt are adjacent, as the original's repeat-then-view.
        return TextConditions(*(t.repeat_interleave(n, dim=0) for t in (self.embeds, self.mask, self.pooled)))

    @staticmethod
    def cat(first: TextConditions, second: TextConditions) -> TextConditions:
        """Stack along the batch, right-padding the shorter text (mask 0) so the lengths agree."""
        length = max(first.embeds.shape[1], second.embeds.shape[1])
        parts = [c.padded_to(length) for c in (first, second)]
        return TextConditions(*(torch.cat(pair) for pair in zip(*(c.astuple() for c in parts))))

    def padded_to(self, length: int) -> TextConditions:
        extra = length - self.embeds.shape[1]
        if extra == 0:
            return self
        embeds = torch.nn.functional.pad(self.embeds, (0, 0, 0, extra))
        return TextConditions(embeds, torch.nn.functional.pad(self.mask, (0, extra)), self.pooled)

    def astuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.embeds, self.mask, self.pooled

    def half(self, index: int) -> TextConditions:
        """The first (0) or second (1) half of the batch: one branch of a [negative | positive] CFG batch."""
        return TextConditions(*(t.chunk(2)[index] for t in self.astuple()))


@dataclass
class HunyuanVideoPipelineOutput:
    videos: torch.Tensor | None  # (B, 3, T, H, W) float32 in [0, 1], on the CPU; None for latent output
    latents: torch.Tensor  # (B, C, T', H/8, W/8) float32
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    step_cache: dict | None = None  # with a step cache: its policy, parameters and computed steps


def embedded_guidance_tensor(scale: float, batch: int, *, dtype: torch.dtype, device) -> torch.Tensor:
    """The distilled-guidance input of the DiT: scale x 1000.

    Parity: the original multiplies after casting to the DiT dtype, so in bf16 6.0 becomes 6016.
    """
    return torch.tensor([scale] * batch, dtype=torch.float32, device=device).to(dtype) * 1000.0


def classifier_free_guidance(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


def decode_latents(vae, latents: torch.Tensor, *, vae_dtype: torch.dtype, use_autocast: bool = True,
                   enable_tiling: bool = True, parallel: SequenceParallelState | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
    """Latents (B, C, T', h, w) -> video (B, 3, T, H, W) in [0, 1], float32 on the CPU.

    With a multi-process `parallel` state and tiling on, the ranks decode different tiles and every rank
    gets the whole video (hyvideo/parallel/vae_decode.py); the latents must be the same on every rank.
    `device`: where the VAE computes (default: where its weights are; differs under sequential offload).
    """
    if enable_tiling:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    vae_param = next(vae.parameters())
    device = device or vae_param.device
    autocast = use_autocast and vae_dtype != torch.float32
    # Parity: the original divides by the scaling factor (no shift) and decodes under autocast.
    z = latents.to(device) / vae.config.scaling_factor
    z = z if autocast else z.to(vae_param.dtype)
    with torch.inference_mode(), torch.autocast(device.type, dtype=vae_dtype, enabled=autocast):
        video = parallel_vae_decode(vae, z, parallel)  # vae.decode(z) in a single process
    return (video / 2 + 0.5).clamp(0, 1).cpu().float()


class NonFiniteLatentsError(ValueError):
    """The latents hold NaN or inf: the output would be a black or garbage video."""


def check_finite_latents(latents: torch.Tensor, *, step: int, steps: int) -> None:
    """Raise NonFiniteLatentsError unless every latent value is finite (after denoising step `step`)."""
    if not bool(torch.isfinite(latents).all()):
        raise NonFiniteLatentsError(
            f"the latents are not finite (NaN or inf) after denoising step {step} of {steps}: the DiT "
            "weights are damaged or overflow in this precision (check --dit-weight, try --precision bf16 or "
            "fp32)"
        )


def latent_frames(video_length: int, time_compression: int = 4) -> int:
    return (video_length - 1) // time_compression + 1


class _StageTimer:
    """Wall-clock seconds per stage, synchronising the device so queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        yield
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)
        self.seconds[name] = time.perf_counter() - started


class HunyuanVideoPipeline(DiffusionPipeline):
    """Flow-matching text-to-video sampling with the HunyuanVideo DiT.

    `dit_dtype` is the denoising autocast dtype (`--precision`); `vae_dtype` the decoding one
    (`--vae-precision`); `use_autocast=False` runs every module in its stored dtype. `parallel`: under
    torchrun, the sequence-parallel state; then every rank runs the pipeline with the same inputs, the
    initial noise is rank 0's, the DiT (given the same state) splits its tokens and the VAE decodes tiles
    in parallel. Every rank returns the same videos.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"

    def __init__(self, vae, text_encoder, text_encoder_2, transformer, scheduler, *,
                 dit_dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype = torch.float16,
                 use_autocast: bool = True, parallel: SequenceParallelState | None = None,
                 offload: OffloadPlan | None = None, cfg_parallel: CfgBranch | None = None):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                              transformer=transformer, scheduler=scheduler)
        self.dit_dtype, self.vae_dtype, self.use_autocast = dit_dtype, vae_dtype, use_autocast
        self.parallel, self.offload = parallel, offload
        self.cfg_parallel = cfg_parallel  # --cfg-parallel: this rank denoises one guidance branch only

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (under offload, weights may wait elsewhere)."""
        return self.offload.device if self.offload is not None else next(self.transformer.parameters()).device

    def stage(self, *names: str) -> contextlib.AbstractContextManager:
        """Bring the named components onto the device for one stage (a no-op without offload)."""
        return self.offload.stage(*names) if self.offload is not None else contextlib.nullcontext()

    @property
    def _execution_device(self) -> torch.device:
        return self.device

    # ---------------------------------------------------------------------------------------------
    # Steps
    # ---------------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], *, data_type: str = "video") -> TextConditions:
        """LLM hidden states + mask and CLIP pooled output for a list of prompts."""
        llm = self.text_encoder.encode(prompts, data_type=data_type, device=self.device)
        clip = self.text_encoder_2.encode(prompts, device=self.device)
        return TextConditions(llm.hidden_state, llm.attention_mask, clip.pooled_output)

    def prepare_latents(self, batch: int, *, video_length: int, height: int, width: int,
                        dtype: torch.dtype, generator: list[torch.Generator] | None) -> torch.Tensor:
        """Gaussian noise, one draw per video so each seed reproduces its own video.

        Parity: the original draws in the prompt-embedding dtype (fp16) on the execution device with
        one generator per video, and does not scale the noise.
        """
        # out_channels: the latent channels (the legacy I2V DiT takes 33 input channels for 16 latent ones)
        shape = (1, self.transformer.config.out_channels, latent_frames(video_length),
                 height // 8, width // 8)
        if generator is None:
            return torch.randn((batch, *shape[1:]), dtype=dtype, device=self.device)
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} videos: pass one per video")
        draws = [torch.randn(shape, generator=g, dtype=dtype, device=g.device) for g in generator]
        return torch.cat(draws).to(self.device)

    def predict_velocity(self, latents: torch.Tensor, t: torch.Tensor, cond: TextConditions,
                         *, guidance_scale: float, embedded_guidance_scale: float | None,
                         step_cache: StepCache | None = None) -> torch.Tensor:
        """One DiT evaluation, with classifier-free guidance when guidance_scale > 1.

        With a step cache the whole batch (negative and positive halves) takes one decision. Under
        --cfg-parallel (`cfg_parallel`) this rank evaluates only its branch of the CFG batch and the paired
        rank the other; the two velocities are exchanged and combined identically on both.
        """
        do_cfg = guidance_scale > 1.0
        split_cfg = do_cfg and self.cfg_parallel is not None
        if split_cfg:
            cond = cond.half(self.cfg_parallel.branch)
        x_in = torch.cat([latents] * 2) if do_cfg and not split_cfg else latents
        batch = x_in.shape[0]
        guidance = None
        if embedded_guidance_scale is not None:
            guidance = embedded_guidance_tensor(embedded_guidance_scale, batch, dtype=self.dit_dtype,
                                                device=self.device)
        with torch.autocast(self.device.type, dtype=self.dit_dtype, enabled=self._autocast(self.dit_dtype)):
            cache_arg = {} if step_cache is None else {"step_cache": step_cache}
            v = self.transformer(x_in, t.repeat(batch), cond.embeds, cond.mask, cond.pooled,
                                 guidance=guidance, **cache_arg)
            if do_cfg:
                v_uncond, v_cond = self.cfg_parallel.exchange(v) if split_cfg else v.chunk(2)
                v = classifier_free_guidance(v_uncond, v_cond, guidance_scale)
        return v

    def denoise(self, latents: torch.Tensor, cond: TextConditions, *, guidance_scale: float,
                embedded_guidance_scale: float | None, callback: StepCallback | None = None,
                show_progress: bool = True, step_cache: StepCache | None = None,
                image_condition: ImageCondition | None = None) -> torch.Tensor:
        """The sampling loop; with `image_condition` (I2V) the reference image enters every step."""
        timesteps = self.scheduler.timesteps
        self.set_progress_bar_config(disable=not show_progress)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if step_cache is not None:
                    step_cache.begin_step(i)
                x = latents if image_condition is None else image_condition.model_input(latents)
                v = self.predict_velocity(x, t, cond, guidance_scale=guidance_scale,
                                          embedded_guidance_scale=embedded_guidance_scale,
                                          step_cache=step_cache)
                if image_condition is None:
                    latents = self.scheduler.step(v, t, latents)  # fp32 from here on
                else:
                    latents = image_condition.step(self.scheduler, v, t, latents)
                if i in (0, len(timesteps) - 1):  # two syncs per video: cheap, and catches NaN weights
                    check_finite_latents(latents, step=i + 1, steps=len(timesteps))
                if callback is not None:
                    callback(i, t, latents)
                progress.update()
        return latents

    def decode(self, latents: torch.Tensor, *, enable_tiling: bool = True) -> torch.Tensor:
        return decode_latents(self.vae, latents, vae_dtype=self.vae_dtype, use_autocast=self.use_autocast,
                              device=self.device,
                              enable_tiling=enable_tiling, parallel=self.parallel)

    def _autocast(self, dtype: torch.dtype) -> bool:
        return self.use_autocast and dtype != torch.float32

    # ---------------------------------------------------------------------------------------------
    # Call
    # ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        height: int,
        width: int,
        video_length: int,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        embedded_guidance_scale: float | None = 6.0,
        num_videos_per_prompt: int = 1,
        generator: list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_conditions: TextConditions | None = None,
        negative_conditions: TextConditions | None = None,
        data_type: str = "video",
        output_type: str = "pt",
        enable_tiling: bool = True,
        callback_on_step_end: StepCallback | None = None,
        show_progress: bool = True,
        cache: CacheConfig | None = None,
        image_condition: ImageCondition | None = None,
        after_encode: Callable[[], None] | None = None,
    ) -> HunyuanVideoPipelineOutput:
        """Sample videos.

        Args:
            prompt: one prompt or a list; or pass `prompt_conditions` (already encoded) instead.
            height, width: pixels, multiples of 16. video_length: frames, 1 or 4k+1.
            guidance_scale: real classifier-free guidance (> 1 runs the negative prompt too).
            embedded_guidance_scale: distilled guidance fed to the DiT (None for HYVideo-T/2).
            generator: one per video (len = prompts x num_videos_per_prompt); or pass `latents`.
            output_type: "pt" decodes to a (B, 3, T, H, W) tensor in [0, 1]; "latent" skips decoding.
            callback_on_step_end: called as f(step_index, timestep, latents) after every step.
            cache: step-cache settings (hyvideo/diffusion/cache.py); each call gets its own fresh state.
            image_condition: image-to-video (hyvideo/i2v/conditioning.py), latents for one video per prompt;
                the prompt conditions must then come from the I2V encoder (`prompt_conditions`).
            after_encode: called once the prompts are encoded and the encoders are back off the device
                (the sampler frees the text encoders there after a run's last prompt).
        """
        timings = _StageTimer(self.device)
        # 1. Check inputs
        self.check_inputs(prompt, prompt_conditions, height=height, width=width, video_length=video_length)
        do_cfg = guidance_scale > 1.0

        # 2. Encode prompts ([negative, positive] when doing CFG, as the original)
        with timings("encode_s"), self.stage("text_encoder", "text_encoder_2"):
            if prompt_conditions is None:
                prompts = [prompt] if isinstance(prompt, str) else list(prompt)
                prompt_conditions = self.encode_prompt(prompts, data_type=data_type)
            num_prompts = prompt_conditions.embeds.shape[0]
            cond = prompt_conditions.repeat(num_videos_per_prompt)
            if do_cfg:
                if negative_conditions is None:
                    negatives = self._negative_prompts(negative_prompt, num_prompts)
                    negative_conditions = self.encode_prompt(negatives, data_type=data_type)
                cond = TextConditions.cat(negative_conditions.repeat(num_videos_per_prompt), cond)
        if after_encode is not None:
            after_encode()

        # 3. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)

        # 4. Initial noise, (B, C, T', H/8, W/8)
        batch = num_prompts * num_videos_per_prompt
        if latents is None:
            latents = self.prepare_latents(batch, video_length=video_length, height=height, width=width,
                                           dtype=prompt_conditions.embeds.dtype, generator=generator)
        if image_condition is not None:
            image_condition = image_condition.repeat(num_videos_per_prompt)
            latents = image_condition.initial_latents(latents)
        latents = latents.to(self.device)
        if self.parallel is not None:
            # Every rank must denoise the same noise: take rank 0's (seeds agree too; this also covers
            # generator=None and generators that differ by device).
            latents = broadcast_from_main(latents, self.parallel)

        # 5. Denoise (with this video's own step-cache state, if any)
        step_cache = StepCache.create(cache, num_steps=len(self.scheduler.timesteps), height=height,
                                      width=width)
        with timings("denoise_s"), self.stage("transformer"):
            latents = self.denoise(latents, cond, guidance_scale=guidance_scale,
                                   embedded_guidance_scale=embedded_guidance_scale,
                                   callback=callback_on_step_end, show_progress=show_progress,
                                   step_cache=step_cache, image_condition=image_condition)
        if step_cache is not None:
            step_cache.log_summary()

        # 6. Decode
        videos = None
        if output_type != "latent":
            with timings("decode_s"), self.stage("vae"):
                videos = self.decode(latents, enable_tiling=enable_tiling)
        return HunyuanVideoPipelineOutput(videos=videos, latents=latents, timings=timings.seconds,
                                          step_cache=step_cache.summary() if step_cache is not None else None)

    @staticmethod
    def check_inputs(prompt, prompt_conditions, *, height: int, width: int, video_length: int) -> None:
        if (prompt is None) == (prompt_conditions is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_conditions`")
        if height <= 0 or width <= 0 or height % 16 or width % 16:
            raise ValueError(f"height and width must be positive multiples of 16, got {height}x{width}")
        if video_length < 1 or (video_length - 1) % 4:
            raise ValueError(f"video_length must be 1 or 4k+1, got {video_length}")

    @staticmethod
    def resolve_negative_prompt(negative_prompt: str | None) -> str:
        # Parity: the original's default negative prompt when none (or "") is given.
        return negative_prompt.strip() if negative_prompt and negative_prompt.strip() else NEGATIVE_PROMPT

    def _negative_prompts(self, negative_prompt: str | list[str] | None, count: int) -> list[str]:
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [self.resolve_negative_prompt(negative_prompt)] * count
        else:
            negatives = [self.resolve_negative_prompt(n) for n in negative_prompt]
        if len(negatives) != count:
            raise ValueError(f"got {len(negatives)} negative prompts for {count} prompts")
        return negatives
