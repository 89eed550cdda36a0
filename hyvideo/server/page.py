"""The Gradio page: a form that queues jobs in the same store as /v1/videos, then follows them.

Generate validates the form with the API's request checks (an error shows as a message and queues
nothing), queues the job, then polls the store: the queue position while it waits, a per-step progress bar
while it runs, and the player, the seed used and the sidecar download when it is done. Cancel flags the
job; the worker stops it between two steps. The gallery lists earlier results, newest first. With LoRAs
loaded at start-up (--lora), one number per LoRA (its start-up scale by default) sets its scale for the job.
On an image-to-video server (--i2v-mode) an image input replaces the size controls (the size is the
image's bucket); the image goes into the request as a data URL, exactly as an API client sends it.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from pathlib import Path
from typing import Any

import gradio as gr

from hyvideo.diffusion.cache import CACHE_POLICIES
from hyvideo.server.schema import GUIDANCE_RANGE, LENGTH_PRESETS, RESOLUTION_PRESETS, RequestError
from hyvideo.server.service import TINY_BANNER, Service
from hyvideo.server.store import QueueFull

logger = logging.getLogger(__name__)

POLL_S = 0.25
GALLERY_SIZE = 24
CUSTOM = "Custom"
DEFAULT_PROMPT = "A cat walks on the grass, realistic style."  # Parity: the original page's default
_RESOLUTIONS = {f"{label} ({w}x{h})": (w, h) for label, w, h in RESOLUTION_PRESETS}
_LENGTHS = dict(LENGTH_PRESETS)
_BANNER_CSS = ("padding:12px;border:2px solid #d97706;background:#fef3c7;color:#78350f;"
               "border-radius:8px;font-weight:600")


def _preset_label(table: dict[str, Any], value: Any) -> str:
    return next((label for label, v in table.items() if v == value), CUSTOM)


def build_page(service: Service) -> gr.Blocks:
    """The page's layout and events (mount it with gr.mount_gradio_app)."""
    d, limits = service.defaults, service.limits
    i2v = service.i2v_resolution is not None
    with gr.Blocks(title="HunyuanVideo") as page:
        gr.Markdown("# HunyuanVideo — image to video" if i2v else "# HunyuanVideo — text to video")
        if service.tiny_weights:
            gr.HTML(f'<div id="tiny-banner" style="{_BANNER_CSS}">{TINY_BANNER}</div>')
        with gr.Row():
            with gr.Column():
                # An upload reaches the request as the file sent; format="png" (lossless) and no mode
                # conversion for what Gradio saves itself (webcam, clipboard)
                image = gr.Image(type="filepath", format="png", image_mode=None, elem_id="image", visible=i2v,
                                 label=f"First frame (the video is its {service.i2v_resolution} bucket)")
                prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, lines=3, elem_id="prompt")
                negative = gr.Textbox(
                    label="Negative prompt (used when CFG scale > 1; empty: the original's)",
                    elem_id="negative_prompt")
                with gr.Row(visible=not i2v):
                    resolution = gr.Dropdown([*_RESOLUTIONS, CUSTOM], label="Resolution (width x height)",
                                             value=_preset_label(_RESOLUTIONS, (d.width, d.height)))
                    width = gr.Number(d.width, label="Width", precision=0, step=16, elem_id="width")
                    height = gr.Number(d.height, label="Height", precision=0, step=16, elem_id="height")
                with gr.Row():
                    length = gr.Dropdown([*_LENGTHS, CUSTOM], label="Length",
                                         value=_preset_label(_LENGTHS, d.video_length))
                    frames = gr.Number(d.video_length, label="Frames (1 or 4k+1)", precision=0, step=4,
                                       elem_id="frames")
                steps = gr.Slider(1, limits.max_steps, value=d.infer_steps, step=1, label="Steps",
                                  elem_id="steps")
                with gr.Accordion("Advanced", open=False):
                    seed = gr.Textbox("" if d.seed is None else str(d.seed), label="Seed (empty: random)",
                                      elem_id="seed")
                    embedded = gr.Slider(*GUIDANCE_RANGE, value=d.embedded_cfg_scale, step=0.5,
                                         label="Embedded guidance scale")
                    cfg = gr.Slider(*GUIDANCE_RANGE, value=d.cfg_scale, step=0.5,
                                    label="CFG scale (> 1 runs the negative prompt too: twice the work)")
                    shift = gr.Slider(0.5, 20.0, value=d.flow_shift, step=0.5, label="Flow shift")
                    count = gr.Slider(1, limits.max_videos, value=min(d.num_videos, limits.max_videos),
                                      step=1, label="Number of videos")
                    cache = gr.Dropdown(list(CACHE_POLICIES), value=service.cache_policy, elem_id="cache",
                                        label="Step cache (faster, approximate; see README 'Step caching')")
                lora_inputs = _lora_inputs(service.loras)
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column():
                status = gr.Markdown("Ready.", elem_id="status")
                video = gr.Video(label="Video", elem_id="result", interactive=False, autoplay=True)
                with gr.Row():
                    seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed_used")
                    job_id = gr.Textbox(label="Job id (also in /v1/videos)", interactive=False,
                                        elem_id="job_id")
                sidecar = gr.File(label="Sidecar (prompt, seed, every setting)", elem_id="sidecar",
                                  interactive=False)
        gallery = gr.Gallery(label="Earlier results (newest first)", columns=6, height=260, preview=False,
                             object_fit="contain", elem_id="gallery", interactive=False)

        resolution.change(lambda label: _RESOLUTIONS.get(label, (gr.skip(), gr.skip())), resolution,
                          [width, height], queue=False)
        length.change(lambda label: _LENGTHS.get(label, gr.skip()), length, frames, queue=False)
        inputs = [prompt, negative, width, height, frames, steps, seed, embedded, cfg, shift, count, cache,
                  *([image] if i2v else []),  # I2V only: T2V /generate callers see no change
                  *lora_inputs]  # the LoRA numbers last: /generate callers that leave them out still fit
        outputs = [job_id, status, video, seed_used, sidecar, gallery]
        # The store is the queue: Gradio must not hold jobs back in its own queue.
        generate.click(_generate_handler(service, list(service.loras), i2v=i2v), inputs, outputs,
                       api_name="generate", concurrency_limit=None)
        cancel.click(_cancel_handler(service), job_id, status, api_name="cancel", concurrency_limit=None)
        page.load(lambda: gallery_items(service), None, gallery, queue=False)
    return page


def _lora_inputs(loras: dict[str, float]) -> list[gr.Number]:
    """One number per preloaded LoRA (label: its name, value: its start-up scale); none without LoRAs."""
    if not loras:
        return []
    with gr.Accordion("LoRA scales (0 switches a LoRA off)", open=True, elem_id="loras"):
        return [gr.Number(scale, label=name, step=0.05, elem_id=f"lora_{index}")
                for index, (name, scale) in enumerate(loras.items())]


def lora_scales_of(names: list[str], values: tuple | list) -> dict[str, float]:
    """The LoRA numbers of the page as a request's "loras"; an emptied box keeps the start-up scale."""
    return {name: value for name, value in zip(names, values, strict=True) if value is not None}


def form_to_request(prompt, negative, width, height, frames, steps, seed, embedded, cfg, shift,
                    count, cache="none", loras: dict[str, float] | None = None) -> dict:
    """The page's fields as a /v1/videos body (the same checks apply to both)."""
    seed_text = str(seed or "").strip()
    if seed_text and not seed_text.isdigit():
        raise RequestError(f"seed must be a whole number >= 0 or empty (random), got {seed_text!r}")
    if width is None or height is None or frames is None:
        raise RequestError("width, height and frames need a value")
    body = {"prompt": prompt or "", "negative_prompt": negative or None,
            "size": f"{int(width)}x{int(height)}",
            "frames": int(frames), "steps": int(steps), "seed": int(seed_text) if seed_text else None,
            "embedded_guidance_scale": float(embedded), "guidance_scale": float(cfg),
            "flow_shift": float(shift), "n": int(count), "cache": cache or "none"}
    if loras:
        body["loras"] = dict(loras)
    return body


def image_data_url(path: str | Path) -> str:
    """An image file as the request's "image": its own bytes for PNG/JPEG/WebP, else re-encoded as PNG."""
    from PIL import Image

    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as opened:
        kind = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}.get(opened.format)
        if kind is None:  # e.g. a GIF or BMP: the server takes three formats
            buffer = io.BytesIO()
            opened.convert("RGB").save(buffer, format="PNG")
            data, kind = buffer.getvalue(), "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def page_request(form: tuple | list, lora_names: list[str], *, i2v: bool) -> dict:
    """The Generate button's inputs (the form's fields, the image on an I2V server, one number per LoRA)
    as a /v1/videos body."""
    split = len(form) - len(lora_names)
    fields, numbers = list(form[:split]), form[split:]
    image = fields.pop() if i2v else None
    body = form_to_request(*fields, loras=lora_scales_of(lora_names, numbers))
    if i2v:
        del body["size"]  # the image's bucket; without an image the server says one is needed
        if image:
            body["image"] = image_data_url(image)
    return body


def gallery_items(service: Service) -> list[tuple[str, str]]:
    items = []
    for job in service.store.list(limit=GALLERY_SIZE, status="completed"):
        for index in range(len(job.outputs)):
            path = service.output_file(job, index, ".mp4")
            if path is not None:
                items.append((str(path), f"seed {job.seed + index}: {job.request['prompt'][:60]}"))
    return items


def _generate_handler(service: Service, lora_names: list[str], *, i2v: bool = False):
    def generate(*fields, progress=gr.Progress()):  # noqa: B008 - Gradio's injection idiom
        try:
            job = service.submit(page_request(fields, lora_names, i2v=i2v))
        except (RequestError, QueueFull, OSError) as exc:  # OSError: an unreadable upload
            raise gr.Error(str(exc)) from None
        keep = gr.skip()
        while True:
            job = service.store.get(job.id)
            if job is None:
                yield keep, "This job was deleted.", None, "", None, keep
                return
            if job.status == "completed":
                files = [service.output_file(job, 0, s) for s in (".mp4", ".json")]
                note = f" (+{len(job.outputs) - 1} more in the gallery)" if len(job.outputs) > 1 else ""
                yield (job.id, f"Done: {job.outputs[0]}{note}", files[0] and str(files[0]), str(job.seed),
                       files[1] and str(files[1]), gallery_items(service))
                return
            if job.status == "failed":
                yield job.id, f"**{job.error_code}**: {job.error_message}", None, "", None, keep
                return
            if job.status == "queued":
                text = f"Queued: position {service.store.queue_position(job)} (job {job.id})"
            else:
                text = f"Running: step {job.step} of {job.total_steps} (seed {job.seed})"
                progress((job.step, job.total_steps), desc="Denoising", unit="steps")
            yield job.id, text, keep, "" if job.seed is None else str(job.seed), keep, keep
            time.sleep(POLL_S)

    return generate


def _cancel_handler(service: Service):
    def cancel(job_id: str):
        job = service.store.request_cancel(job_id) if job_id else None
        if job is None or job.status == "completed":
            return "Nothing to cancel."
        if job.status == "failed":
            return f"Cancelled ({job.error_code})."
        return "Cancelling: the job stops after its current step."

    return cancel
