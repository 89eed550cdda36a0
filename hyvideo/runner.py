"""What `sample_video.py` does after parsing: load once, sample every prompt, save mp4 + sidecar."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch

from hyvideo.config import Configs
from hyvideo.constants import PRECISION_TO_TYPE
from hyvideo.utils.file_utils import (
    check_writable_dir,
    load_latents,
    make_time_flag,
    safe_filename,
    save_latents,
    save_video,
    unique_path,
    write_sidecar,
)

logger = logging.getLogger(__name__)

FPS = 24
# Errors that come from what the user gave us (flags, files, paths): reported in one line, exit 2.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, PermissionError, ValueError)


def run_cli(configs: Configs) -> int:
    """Run the sampler for the CLI; returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _run(configs)
    except USER_ERRORS as exc:
        logger.debug("details", exc_info=True)
        print(f"sample_video.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(configs: Configs) -> None:
    save_dir = check_writable_dir(configs.runtime.save_path)  # before minutes of model loading
    if configs.runtime.decode_latents is not None:
        decode_saved_latents(configs, configs.runtime.decode_latents, save_dir)
        return
    from hyvideo.inference import HunyuanVideoSampler, draw_seed

    sampling = configs.sampling
    sampler = HunyuanVideoSampler.from_pretrained(configs, use_autocast=not configs.runtime.disable_autocast)
    seed = draw_seed() if sampling.seed is None else sampling.seed  # one seed for the whole run
    for index, prompt in enumerate(sampling.prompts):
        logger.info("Prompt %d/%d: %s", index + 1, len(sampling.prompts), prompt)
        out = sampler.predict(
            prompt, height=sampling.height, width=sampling.width, video_length=sampling.video_length,
            seed=seed, negative_prompt=sampling.neg_prompt, infer_steps=sampling.infer_steps,
            guidance_scale=sampling.cfg_scale, flow_shift=sampling.flow_shift,
            flow_reverse=sampling.flow_reverse, embedded_guidance_scale=sampling.embedded_cfg_scale
            if configs.model.dit.guidance_embed else None,
            num_videos_per_prompt=sampling.num_videos * sampling.batch_size,
            enable_tiling=configs.model.vae_tiling,
        )
        save_outputs(out, configs, save_dir)


def save_outputs(out, configs: Configs, save_dir: Path) -> list[Path]:
    """One mp4 per video, each with a JSON sidecar (and latents with --save-latents)."""
    time_flag = make_time_flag()
    written = []
    for i, seed in enumerate(out.seeds):
        stem = safe_filename(out.prompt, seed=seed, time_flag=time_flag)
        path = unique_path(save_dir, stem, ".mp4", sibling_suffixes=(".json", ".safetensors"))
        record = run_record(configs, prompt=out.prompt, negative_prompt=out.negative_prompt, seed=seed,
                            size=out.size, timings=out.timings)
        if configs.runtime.save_latents:
            record["latents_file"] = path.with_suffix(".safetensors").name
            save_latents(path.with_suffix(".safetensors"), out.latents[i : i + 1], record)
        save_video(out.samples[i], path, fps=FPS, crf=configs.runtime.crf, metadata={"comment": out.prompt})
        write_sidecar(path, record)
        logger.info("Sample saved to: %s", path)
        written.append(path)
    return written


def run_record(configs: Configs, **facts) -> dict:
    """What the sidecar records: the facts of this video, every setting, and library versions."""
    import diffusers
    import transformers

    return {
        **facts,
        "settings": dataclasses.asdict(configs),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "diffusers": diffusers.__version__, "python": sys.version.split()[0]},
    }


def decode_saved_latents(configs: Configs, latents_path: Path, save_dir: Path) -> Path:
    """Decode a file written with --save-latents into an mp4, without loading the DiT or text encoders."""
    from hyvideo.diffusion.pipelines.pipeline_hunyuan_video import decode_latents
    from hyvideo.inference import default_device, load_vae_component

    latents, record = load_latents(latents_path)
    vae = load_vae_component(configs.model, default_device())
    video = decode_latents(vae, latents, vae_dtype=PRECISION_TO_TYPE[configs.model.vae_precision],
                           use_autocast=not configs.runtime.disable_autocast,
                           enable_tiling=configs.model.vae_tiling)
    path = unique_path(save_dir, f"{latents_path.stem}_decoded", ".mp4", sibling_suffixes=(".json",))
    save_video(video[0], path, fps=FPS, crf=configs.runtime.crf)
    write_sidecar(path, {**record, "decoded_from": str(latents_path),
                         "decode_settings": dataclasses.asdict(configs)})
    logger.info("Decoded video saved to: %s", path)
    return path
