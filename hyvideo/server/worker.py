"""The worker: one thread that owns the loaded sampler and runs the queued jobs one at a time.

Per job it draws the seed (when the request left it open), runs `HunyuanVideoSampler.predict` with a step
callback that records progress and checks for cancellation, then writes the mp4s and sidecars with the
CLI's atomic writers. A cancelled job stops between two denoising steps, before anything is decoded or
written, so it leaves no file.

Per-job LoRA scales: rank 0 resolves the request's `loras` against the LoRAs loaded at start-up into the
scale of *every* loaded LoRA (`job_lora_scales`) and puts that map in the `JobSpec`; each rank sets those
scales before `predict` and restores nothing after, so a job's choice never outlives it (the next job sets
every scale again) and all ranks run the same weights.

Image-to-video: rank 0 reads the job's reference image (encoded bytes) from the store and puts it in the
`JobSpec`, so every rank decodes the same bytes into the same `reference_image` (a few MB pickled once per
job by `broadcast_object_list`, nothing next to sampling).

Under torchrun only rank 0 has a queue. Before each job it broadcasts a `JobSpec` to the other ranks
(`follow_rank0`), which then run the same `predict` with it; the cancel decision is broadcast at every step
so that all ranks stop at the same step. While idle, rank 0 broadcasts a heartbeat now and then, so the
waiting ranks' broadcast never reaches the process group's timeout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyvideo.config import Configs
from hyvideo.diffusion.cache import CacheConfig
from hyvideo.server.images import decode_image
from hyvideo.server.schema import JobRequest
from hyvideo.server.store import Job, JobStore

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how long the idle worker sleeps when no one wakes it
HEARTBEAT_S = 30.0  # rank 0 -> other ranks while idle; far below any collective timeout


class JobCancelled(Exception):
    """Raised from the step callback to stop a job between two steps."""


@dataclass(frozen=True)
class JobSpec:
    """What rank 0 sends every rank: run a job (request + concrete seed), keep waiting, or stop."""

    kind: str  # "run", "idle" or "stop"
    job_id: str | None = None
    request: dict[str, Any] | None = None
    seed: int | None = None
    lora_scales: dict[str, float] | None = None  # every loaded LoRA's scale for this job, in load order
    image: bytes | None = None  # I2V: the reference image's encoded bytes (a few MB, sent once per job)


# Feature fields that are not `predict` arguments: applied to the sampler before it (see run_job), or, for
# "image", the record of the reference image whose bytes travel in JobSpec.image.
SAMPLER_STATE_FEATURES = ("loras", "image")


def feature_kwargs(features: dict[str, Any], configs: Configs) -> dict[str, Any]:
    """Extra `predict` keyword arguments for a request's feature fields (schema.FEATURE_FIELDS).

    Where a per-job feature reaches `predict` (LoRA scales are set on the sampler instead:
    `job_lora_scales`); without feature fields a job samples exactly as the server's flags say.
    """
    unknown = set(features) - {"cache", "cache_threshold", *SAMPLER_STATE_FEATURES}
    if unknown:
        raise ValueError(f"no sampler support for feature field(s) {sorted(unknown)}")
    return {"cache": job_cache(configs.cache, features)}


def job_lora_scales(startup: Mapping[str, float], features: dict[str, Any]) -> dict[str, float] | None:
    """The scale of every loaded LoRA for one job: the request's, else the start-up scale (--lora).

    None when no LoRA is loaded. Raises ValueError when the request names a LoRA that is not loaded (a job
    queued before a restart with other --lora flags).
    """
    asked = features.get("loras") or {}
    missing = sorted(set(asked) - set(startup))
    if missing:
        raise ValueError(f"LoRA(s) {', '.join(missing)} are not loaded on this server (loaded: "
                         f"{', '.join(startup) or 'none'}); it was restarted with other --lora flags")
    if not startup:
        return None
    return {name: float(asked.get(name, scale)) for name, scale in startup.items()}


def job_image(store: JobStore, job: Job, i2v: bool) -> bytes | None:
    """The reference image stored with a job, checked against the server's mode; raise ValueError.

    A job queued before a restart in the other mode (or whose image is gone) fails alone, before any
    broadcast, instead of reaching `predict` with the wrong inputs.
    """
    record = job.request.get("features", {}).get("image")
    if not i2v:
        if record is not None:
            raise ValueError("this job has an image but the server now runs text-to-video (restarted without "
                             "--i2v-mode); submit it again to an image-to-video server")
        return None
    if record is None:
        raise ValueError("this job has no image but the server now runs image-to-video (--i2v-mode); submit "
                         "it again with an image")
    data = store.image(job.id)
    if data is None or hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ValueError("this job's image is missing from the queue's database; submit it again")
    return data


def apply_lora_scales(sampler, scales: Mapping[str, float] | None) -> None:
    """Set every loaded LoRA to its scale for this job, whatever the previous job left.

    Every scale is set, even an unchanged one: each call re-merges the LoRA's layers from their exact
    originals (a pass over those weights, small next to a job), so a job's weights are rebuilt from the
    scales it asked for rather than trusted from the last job (whose re-merge may have failed part-way).
    """
    for name, scale in (scales or {}).items():
        sampler.set_lora_scale(name, scale)


def job_cache(server_cache: CacheConfig, features: dict[str, Any]) -> CacheConfig:
    """The step cache of one job: the server's (--cache*), or the policy / threshold the request names."""
    policy = features.get("cache", server_cache.policy)
    if policy == server_cache.policy and "cache_threshold" not in features:
        return server_cache
    threshold = features.get("cache_threshold", server_cache.threshold if policy == server_cache.policy
                             else None)
    ratios = server_cache.ratios if policy == "magcache" else None
    return dataclasses.replace(server_cache, policy=policy, threshold=threshold, ratios=ratios,
                               ratios_source=server_cache.ratios_source if ratios is not None else None,
                               calibrate=False, calibrate_path=None)


def run_job(sampler, configs: Configs, spec: JobSpec, *, on_step: Callable[[int, int], bool],
            parallel=None):
    """Sample one job on this rank; `on_step(step, total)` returns True to cancel (rank 0's verdict wins).

    Returns the sampler's PredictOutput; raises JobCancelled when cancelled.
    """
    request = JobRequest.from_dict(spec.request)
    multi = parallel is not None and parallel.enabled

    def step_callback(index, timestep, latents):
        stop = on_step(index + 1, request.steps)
        if multi:
            stop = _agree_flag(stop, parallel)
        if stop:
            raise JobCancelled(f"cancelled at step {index + 1} of {request.steps}")

    apply_lora_scales(sampler, spec.lora_scales)
    # Decoded on every rank from the same bytes, with the request-time checks: the same RGB pixels.
    reference = decode_image(spec.image) if spec.image is not None else None
    guidance_embed = sampler.transformer.config.guidance_embed
    return sampler.predict(
        request.prompt, height=request.height, width=request.width, video_length=request.frames,
        seed=spec.seed, negative_prompt=request.negative_prompt, infer_steps=request.steps,
        guidance_scale=request.guidance_scale, flow_shift=request.flow_shift,
        flow_reverse=configs.sampling.flow_reverse,
        embedded_guidance_scale=request.embedded_guidance_scale if guidance_embed else None,
        num_videos_per_prompt=request.n, enable_tiling=configs.model.vae_tiling, show_progress=False,
        callback=step_callback, reference_image=reference, i2v_stability=configs.i2v.stability,
        **feature_kwargs(request.features, configs),
    )


def job_configs(configs: Configs, spec: JobSpec) -> Configs:
    """The server's configs with this job's sampling values and LoRA scales: what its sidecar records."""
    request = JobRequest.from_dict(spec.request)
    model = configs.model
    if spec.lora_scales and len(spec.lora_scales) == len(model.loras):  # both in load order
        scales = spec.lora_scales.values()
        model = dataclasses.replace(model, loras=tuple(
            dataclasses.replace(lora, scale=scale) for lora, scale in zip(model.loras, scales, strict=True)))
    # The CLI records its --i2v-image-path here; a job's image has no path (its sha256 is in the sidecar's
    # "reference_image", see job_facts).
    i2v = dataclasses.replace(configs.i2v, image_path=None)
    return dataclasses.replace(configs, sampling=request.sampling_config(configs.sampling, seed=spec.seed),
                               cache=job_cache(configs.cache, request.features), model=model, i2v=i2v)


def job_facts(spec: JobSpec) -> dict[str, Any]:
    """What every sidecar of a job records beside the settings: the job id, and the reference image (I2V:
    sha256, bytes, format, its width x height, the bucket (H, W) it became and the --i2v-resolution)."""
    facts: dict[str, Any] = {"job_id": spec.job_id}
    image = spec.request.get("features", {}).get("image")
    if image is not None:
        facts["reference_image"] = dict(image)
    return facts


class Worker:
    """Rank 0's job loop in a background thread."""

    def __init__(self, store: JobStore, sampler, configs: Configs, save_dir: Path, *, parallel=None,
                 draw_seed: Callable[[], int] | None = None, loras: Mapping[str, float] | None = None):
        """`loras`: the LoRAs loaded at start-up (name -> scale, in load order), which a job may rescale."""
        from hyvideo.inference import draw_seed as default_draw

        self.store, self.sampler, self.configs, self.save_dir = store, sampler, configs, save_dir
        self.loras = dict(loras or {})
        self.parallel = parallel if parallel is not None and parallel.enabled else None
        self._draw_seed = draw_seed or default_draw
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hyvideo-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A job was queued: look at once instead of after the poll interval."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running job (if any), tell the other ranks to stop, end the thread."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.is_set():
            job = self.store.claim_next()
            if job is not None:
                self._process(job)
                last_beat = time.monotonic()
                continue
            self._wake.wait(POLL_S)
            self._wake.clear()
            if self.parallel is not None and time.monotonic() - last_beat > HEARTBEAT_S:
                share_spec(JobSpec("idle"), self.parallel)
                last_beat = time.monotonic()
        if self.parallel is not None:
            share_spec(JobSpec("stop"), self.parallel)

    def _process(self, job: Job) -> None:
        from hyvideo.runner import save_outputs

        seed = job.request["seed"] if job.request.get("seed") is not None else self._draw_seed()
        self.store.set_seed(job.id, seed)
        try:  # before any broadcast: a job that cannot run fails alone, the other ranks keep waiting
            scales = job_lora_scales(self.loras, job.request.get("features", {}))
            image = job_image(self.store, job, self.configs.i2v.enabled)
        except ValueError as exc:
            self.store.fail(job.id, "error", str(exc)[:500])
            return
        spec = JobSpec("run", job.id, job.request, seed, scales, image)
        logger.info("Job %s: %s (seed %d%s)", job.id, job.request["prompt"][:80], seed,
                    f", LoRA scales {scales}" if scales else "")
        try:
            if self.parallel is not None:
                share_spec(spec, self.parallel)
            out = run_job(self.sampler, self.configs, spec, on_step=self._progress(job.id),
                          parallel=self.parallel)
            if self.store.is_deleted(job.id):
                raise JobCancelled("deleted while running")
            paths = save_outputs(out, job_configs(self.configs, spec), self.save_dir,
                                 extra_facts=job_facts(spec))
            self.store.complete(job.id, [p.name for p in paths])
            logger.info("Job %s completed: %s", job.id, ", ".join(p.name for p in paths))
        except JobCancelled as exc:
            logger.info("Job %s %s", job.id, exc)
            if self._stop.is_set():  # the server is shutting down: the same verdict as after a crash
                self.store.fail(job.id, "interrupted", "the server stopped while this job was running; "
                                "submit it again")
            else:
                self.store.fail(job.id, "cancelled", str(exc))
        except Exception as exc:  # the job fails, the server goes on
            logger.exception("Job %s failed", job.id)
            self.store.fail(job.id, "error", f"{type(exc).__name__}: {exc}"[:500])
            if self.parallel is not None:  # the other ranks may be stuck in a collective: stop them all
                logger.critical("a job failed under torchrun; stopping rank 0 so the launch ends")
                os._exit(1)

    def _progress(self, job_id: str) -> Callable[[int, int], bool]:
        def on_step(step: int, total: int) -> bool:
            self.store.set_progress(job_id, step, total)
            return self._stop.is_set() or self.store.cancel_requested(job_id)

        return on_step


# --------------------------------------------------------------------------------------------------
# torchrun: the ranks other than 0
# --------------------------------------------------------------------------------------------------


def share_spec(spec: JobSpec | None, parallel) -> JobSpec:
    """Rank 0 passes its spec, the others None; every rank returns rank 0's spec."""
    import torch.distributed as dist

    box = [dataclasses.asdict(spec) if spec is not None else None]
    dist.broadcast_object_list(box, src=0, device=parallel.comm_device)
    return JobSpec(**box[0])


def _agree_flag(flag: bool, parallel) -> bool:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64, device=parallel.comm_device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def follow_rank0(sampler, configs: Configs, parallel) -> None:
    """Ranks 1..N-1: run every job rank 0 announces, until it says stop."""
    while True:
        spec = share_spec(None, parallel)
        if spec.kind == "stop":
            return
        if spec.kind != "run":
            continue
        try:
            run_job(sampler, configs, spec, on_step=lambda step, total: False, parallel=parallel)
        except JobCancelled:
            pass
