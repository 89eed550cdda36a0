"""What the page and the API share: the queue, the request defaults and limits, and the output files.

Files are reached only through a job: the job row holds the names the worker wrote (built by
`safe_filename`, never taken from a request), and `output_file` joins one of them to the output folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyvideo.config import SamplingConfig, ServerLimits
from hyvideo.server.schema import MAX_LORA_SCALE, MODEL_ID, JobRequest, parse_request
from hyvideo.server.store import Job, JobStore

logger = logging.getLogger(__name__)

TINY_BANNER = ("Demo mode: this server runs on TINY RANDOM weights (hyvideo/testing), not HunyuanVideo's. "
               "Everything is real except the weights: the videos are noise. For real videos put the "
               "official weights under ckpts/ (see ckpts/README.md) or pass --model-base.")


@dataclass
class Service:
    """The shared state behind both front ends."""

    store: JobStore
    defaults: SamplingConfig
    limits: ServerLimits
    save_dir: Path
    wake: Callable[[], None] = lambda: None  # tell the worker a job is waiting
    tiny_weights: bool = False
    token: str | None = None
    cache_policy: str = "none"  # the server's --cache: the page's default step cache
    # The LoRAs loaded at start-up (--lora), name -> start-up scale in load order: a job may rescale them.
    loras: dict[str, float] = field(default_factory=dict)
    # --i2v-resolution when the server runs image-to-video (--i2v-mode): every job then carries an image.
    i2v_resolution: str | None = None

    def submit(self, body: Any) -> Job:
        """Validate a request body and queue it (RequestError, QueueFull on refusal)."""
        request = parse_request(body, self.defaults, self.limits, loras=self.loras,
                                i2v_resolution=self.i2v_resolution)
        job = self.store.add(request.to_dict(), max_queue=self.limits.max_queue,
                             image=request.image.data if request.image is not None else None)
        self.wake()
        return job

    def output_file(self, job: Job, index: int, suffix: str) -> Path | None:
        """The `index`-th video of a completed job (suffix ".mp4") or its sidecar (".json"), if present."""
        if job.status != "completed" or not 0 <= index < len(job.outputs):
            return None
        name = Path(job.outputs[index]).name  # a bare name, as the worker stored it
        path = self.save_dir / Path(name).with_suffix(suffix).name
        return path if path.is_file() else None

    def delete(self, job_id: str) -> Job | None:
        """Remove a job from the list (cancelling it if it runs) and delete its files."""
        job = self.store.delete(job_id)
        if job is not None:
            for index in range(len(job.outputs)):
                for suffix in (".mp4", ".json", ".safetensors"):
                    path = self.output_file(job, index, suffix)
                    if path is not None:
                        path.unlink(missing_ok=True)
        return job

    def describe(self, job: Job) -> dict[str, Any]:
        """A job as the API shows it (OpenAI's video object plus our fields)."""
        request = JobRequest.from_dict(job.request)
        error = {"code": job.error_code, "message": job.error_message} if job.status == "failed" else None
        return {
            "id": job.id, "object": "video", "model": MODEL_ID, "status": job.status,
            "progress": job.progress, "created_at": int(job.created_at),
            "completed_at": int(job.finished_at) if job.status == "completed" else None,
            "size": request.size, "seconds": request.seconds, "error": error,
            # ours
            "prompt": request.prompt, "frames": request.frames, "n": request.n, "seed": job.seed,
            "started_at": int(job.started_at) if job.started_at else None, "step": job.step,
            "total_steps": job.total_steps, "queue_position": self.store.queue_position(job),
            "cancel_requested": job.cancel_requested, "files": [Path(n).name for n in job.outputs],
            "request": {k: v for k, v in job.request.items() if k != "prompt"},
        }

    def server_info(self) -> dict[str, Any]:
        d = self.defaults
        return {
            "model": MODEL_ID, "tiny_random_weights": self.tiny_weights,
            "banner": TINY_BANNER if self.tiny_weights else None,
            "defaults": {"size": f"{d.width}x{d.height}", "frames": d.video_length, "steps": d.infer_steps,
                         "guidance_scale": d.cfg_scale, "embedded_guidance_scale": d.embedded_cfg_scale,
                         "flow_shift": d.flow_shift, "n": d.num_videos, "seed": d.seed},
            "limits": {"max_steps": self.limits.max_steps, "max_side": self.limits.max_side,
                       "max_frames": self.limits.max_frames, "max_videos": self.limits.max_videos,
                       "max_queue": self.limits.max_queue, "max_prompt_chars": self.limits.max_prompt_chars,
                       "max_lora_scale": MAX_LORA_SCALE, "max_image_bytes": self.limits.max_image_bytes,
                       "max_image_side": self.limits.max_image_side},
            "loras": dict(self.loras),  # the names a request's "loras" may use, with their start-up scales
            # None: text-to-video; else every request needs "image" and the size is its bucket
            "i2v": {"resolution": self.i2v_resolution} if self.i2v_resolution is not None else None,
        }
