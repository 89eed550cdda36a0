"""What `sample_video.py` does after parsing: load once, sample every prompt, save mp4 + sidecar.

Under torchrun every rank runs all of this with the same flags: checks that every rank decides alike come
first (no collective yet), then the process group, then loading and sampling on every rank, and saving on
the main process only. A rank that fails exits at once (its peers' collectives then fail or torchrun stops
them) instead of leaving the others waiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from hyvideo.config import Configs, RuntimeConfig
from hyvideo.constants import PRECISION_TO_TYPE
from hyvideo.prompt_rewrite import RewriteConfig, RewriteError, RewriteResult
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
# Exit statuses after a signal: the shell's 128 + signal number (SIGINT 2 -> 130, SIGTERM 15 -> 143).
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
# Libraries whose INFO logs and loading progress bars only add noise to ours.
QUIET_LOGGERS = ("transformers", "diffusers", "huggingface_hub", "urllib3", "httpx", "filelock", "PIL")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every cleanup path runs for it too."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


class OutputWriteError(ValueError):
    """Writing a video's files failed (full disk, ffmpeg error); its partial files were removed."""


def run_cli(configs: Configs) -> int:
    """Run the sampler for the CLI; returns the process exit status.

    Ctrl-C and SIGTERM stop the run the same way: the ffmpeg writer is killed, partial files are removed,
    one line is printed, and the status is 130 (SIGINT) or 143 (SIGTERM).
    """
    in_main_thread = _in_main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return _run_cli(configs)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        if configs.runtime.local_rank == 0:
            name = "SIGTERM" if terminated else "SIGINT (Ctrl-C)"
            print(f"sample_video.py: interrupted by {name}; partial outputs were removed", file=sys.stderr,
                  flush=True)
        return EXIT_SIGTERM if terminated else EXIT_SIGINT
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _run_cli(configs: Configs) -> int:
    runtime = configs.runtime
    _setup_logging(runtime)
    if runtime.plan_memory is not None:
        print(memory_plan_report(configs))
        return 0
    # 1. Checks every rank decides alike from the flags and files, before any collective: one message
    #    (local rank 0), status 2 on every rank.
    layout = None  # decoding saved latents splits only the VAE tiles: every rank in one group
    loras: list = []
    try:
        save_dir = check_writable_dir(runtime.save_path)  # before minutes of model loading
        if runtime.decode_latents is None:
            from hyvideo.inference import check_parallel_layout, prepare_loras

            layout = check_parallel_layout(configs)  # chosen here when no degree was given
            configs = dataclasses.replace(configs, runtime=dataclasses.replace(
                runtime, ulysses_degree=layout.ulysses_degree, ring_degree=layout.ring_degree))
            loras = prepare_loras(configs.model)  # a LoRA that does not fit fails before any loading
            configs = with_i2v_bucket(configs)  # a bad --i2v-image-path fails before any loading
            from hyvideo.lowmem.memory_check import check_memory_fits

            check_memory_fits(configs)  # before minutes of loading: refuse what cannot fit
    except USER_ERRORS as exc:
        return _report_user_error(exc, runtime, every_rank=False)
    # 2. The process groups, then the work; a failure from here on ends this rank at once.
    return run_guarded(lambda: _work(configs, save_dir, layout, loras), runtime)


def _work(configs: Configs, save_dir: Path, layout, loras: list | None = None) -> None:
    from hyvideo.inference import init_parallel
    from hyvideo.parallel import destroy

    runtime = configs.runtime
    _quiet_third_party()
    groups = init_parallel(runtime, layout)  # every rank, its sequence group and its CFG branch
    if runtime.decode_latents is not None:
        decode_saved_latents(configs, runtime.decode_latents, save_dir, parallel=groups.world)
    else:
        _sample(configs, save_dir, groups, loras or [])
    destroy(groups.world)


def memory_plan_report(configs: Configs) -> str:
    """--plan-memory: the traced peak memory of this command per stage; given a card size, whether it fits
    (with smaller VAE tiles picked automatically if the default ones would not), and which offload / fp8
    combinations fit at this video size."""
    from hyvideo.lowmem.memory_plan import estimate_peak_memory, fit_vae_tiles, format_plan
    from hyvideo.lowmem.offload import OFFLOAD_MODES

    cfg, sampling = configs.model, configs.sampling
    kwargs = dict(
        height=sampling.height, width=sampling.width, video_length=sampling.video_length,
        precision=cfg.precision, cfg_scale=sampling.cfg_scale, vae_tiling=cfg.vae_tiling, text_len=cfg.text_len,
        dit_config=cfg.dit, batch_size=sampling.num_videos * sampling.batch_size,
        vae_precision=cfg.vae_precision, text_encoder_precision=cfg.text_encoder_precision,
        dit_chunk_tokens=cfg.dit_chunk_tokens,
    )
    card = configs.runtime.plan_memory or None
    mode = configs.runtime.offload_mode
    user_tiles = cfg.vae_tile_size is not None or cfg.vae_tile_frames is not None
    tiles = dict(vae_tile_size=cfg.vae_tile_size or 256, vae_tile_frames=cfg.vae_tile_frames or 64)
    if not card or user_tiles:  # the user's tiles (or the defaults without a card) are planned as given
        estimate = estimate_peak_memory(use_fp8=cfg.use_fp8, offload_mode=mode, **tiles, **kwargs)
        if not card:
            return format_plan(estimate)
    else:
        estimate = fit_vae_tiles(card, use_fp8=cfg.use_fp8, offload_mode=mode, **kwargs)
    report = [format_plan(estimate, card_gib=card)]
    if estimate.vae_tile != (256, 64) and cfg.vae_tiling and not user_tiles:
        why = "so that decoding fits" if estimate.fits(card) else "(the smallest tried; still too large)"
        report.append(f"VAE tiles reduced to {estimate.vae_tile[0]} px / {estimate.vae_tile[1]} frames {why}: "
                      f"run with --vae-tile-size {estimate.vae_tile[0]} --vae-tile-frames {estimate.vae_tile[1]}.")
        logger.info("memory plan: VAE tiles %s px / %s frames", *estimate.vae_tile)
    report.append(f"{'fits' if estimate.fits(card) else 'does not fit'} a {card:g} GiB card "
                  f"(peak {estimate.peak_gib:.1f} GiB in the {estimate.peak_stage} stage)")
    others = [fit_vae_tiles(card, use_fp8=fp8, offload_mode=m, **kwargs)
              for m in OFFLOAD_MODES for fp8 in (False, True)]
    fitting = [e for e in others if e.fits(card)]
    report += ["", f"Combinations at this size that fit {card:g} GiB:",
               format_plan(fitting, card_gib=card) if fitting else "  none"]
    return "\n".join(report)


def _setup_logging(runtime: RuntimeConfig) -> None:
    """INFO on the main process only; the other ranks log warnings and errors, tagged with their rank."""
    tag = f"[rank {runtime.rank}] " if runtime.world_size > 1 else ""
    level = logging.INFO if runtime.is_main_process else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _quiet_third_party() -> None:
    """Model-loading progress bars and INFO chatter of transformers / diffusers / the hub: off."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    for lib in (hf_logging, diffusers_logging):
        lib.set_verbosity_warning()
        lib.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def printable(text: str) -> str:
    """`text` for a log line: control and format characters (newlines, ESC, bidi overrides) escaped."""
    import unicodedata

    return "".join(
        ch if ch == " " or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Zl", "Zp")
        else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def _report_user_error(exc: BaseException, runtime: RuntimeConfig, *, every_rank: bool) -> int:
    logger.debug("details", exc_info=True)
    if getattr(exc, "main_rank_reports", False):  # the same failure, decided on rank 0 for every rank
        every_rank = runtime.rank == 0
    if every_rank or runtime.local_rank == 0:
        tag = f"[rank {runtime.rank}] " if every_rank and runtime.world_size > 1 else ""
        print(f"sample_video.py: error: {tag}{exc}", file=sys.stderr, flush=True)
    return 2


def run_guarded(work: Callable[[], None], runtime: RuntimeConfig) -> int:
    """Run `work`; return 0, or 2 after a user error (one line on stderr).

    In a multi-process launch a failed rank ends its process at once (status 2 for a user error, 1 with
    a traceback otherwise) without interpreter shutdown, which could wait on the process group: its peers,
    blocked in a collective with it, then see it gone (gloo fails at once; under NCCL torchrun stops them,
    else the collective timeout does), so no rank hangs. In one process other exceptions propagate.
    """
    try:
        work()
    except USER_ERRORS as exc:
        code = _report_user_error(exc, runtime, every_rank=True)
    except OSError as exc:  # ENOSPC and the like outside the writers (they raise OutputWriteError)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        code = _report_user_error(OSError(f"{exc.strerror}: {exc.filename or 'writing'}"), runtime,
                                  every_rank=True)
    except Exception:
        if runtime.world_size == 1:
            raise
        logger.critical("rank %d of %d failed; stopping", runtime.rank, runtime.world_size, exc_info=True)
        code = 1
    else:
        return 0
    if runtime.world_size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _sample(configs: Configs, save_dir: Path, groups, loras: list) -> None:
    from hyvideo.inference import HunyuanVideoSampler, agree_seed

    sampling = configs.sampling
    state = groups.world  # every rank: the seed, the rewrites and who writes
    # A rewrite server is asked before minutes of model loading; the local LLM needs the models first.
    rewrites = rewrite_prompts_for_run(configs, state) if configs.rewrite.uses_endpoint else None
    sampler = HunyuanVideoSampler.from_pretrained(configs, parallel=groups,
                                                  use_autocast=not configs.runtime.disable_autocast)
    if configs.rewrite.enabled and rewrites is None:
        rewrites = rewrite_prompts_for_run(configs, state, sampler=sampler)
    for weights, scale in loras:  # every rank applies the same LoRAs
        sampler.add_lora(weights, scale)
    # The sidecar records the architecture actually built (a dit_config.json / config.json beside the
    # weights can differ from the --model preset).
    configs = dataclasses.replace(configs, model=dataclasses.replace(configs.model,
                                                                     dit=sampler.transformer.config))
    seed = agree_seed(sampling.seed, state)  # one seed for the whole run, the same on every rank
    image = reference_image(configs)  # --i2v-mode: sampling.height/width already hold its bucket
    calibrations = []
    for index, prompt in enumerate(sampling.prompts):
        rewrite = rewrites[index] if rewrites is not None else None
        prompt = rewrite.rewritten if rewrite is not None else prompt
        logger.info("Prompt %d/%d: %s", index + 1, len(sampling.prompts), printable(prompt))
        out = sampler.predict(
            prompt, height=sampling.height, width=sampling.width, video_length=sampling.video_length,
            seed=seed, negative_prompt=sampling.neg_prompt, infer_steps=sampling.infer_steps,
            guidance_scale=sampling.cfg_scale, flow_shift=sampling.flow_shift,
            flow_reverse=sampling.flow_reverse, embedded_guidance_scale=sampling.embedded_cfg_scale
            if sampler.transformer.config.guidance_embed else None,
            num_videos_per_prompt=sampling.num_videos * sampling.batch_size,
            enable_tiling=configs.model.vae_tiling, cache=configs.cache,
            reference_image=image, i2v_stability=configs.i2v.stability,
            release_text_encoders=index == len(sampling.prompts) - 1,  # nothing to encode after this one
        )
        if state.is_main:  # every rank holds the same videos; one writes them
            save_outputs(out, configs, save_dir, rewrite=rewrite)
            calibrations.append(out.step_cache)
    if state.is_main and configs.cache.calibrate:
        report_calibration(calibrations, configs)


def reference_image(configs: Configs):
    """The checked --i2v-image-path image (PIL RGB), or None outside --i2v-mode."""
    if not configs.i2v.enabled:
        return None
    from hyvideo.i2v import load_reference_image

    return load_reference_image(configs.i2v.image_path)


def with_i2v_bucket(configs: Configs) -> Configs:
    """In --i2v-mode, the configs with the image's bucket as the video size (logged); else unchanged."""
    image = reference_image(configs)
    if image is None:
        return configs
    from hyvideo.i2v import bucket_for_image

    height, width = bucket_for_image(image.height, image.width, configs.i2v.resolution)
    logger.info("--i2v-mode: image %dx%d -> %s bucket %dx%d (H x W), which replaces --video-size",
                image.width, image.height, configs.i2v.resolution, height, width)
    guidance = "none (the 33-channel DiT has no guidance_in)"
    if configs.model.dit.guidance_embed:
        guidance = f"{configs.sampling.embedded_cfg_scale} (no I2V repository default; its recipes: 6.0)"
    logger.info("--i2v-mode: %s, flow shift %s, embedded guidance %s", configs.i2v.condition_type,
                configs.sampling.flow_shift, guidance)
    sampling = dataclasses.replace(configs.sampling, height=height, width=width)
    return dataclasses.replace(configs, sampling=sampling)


def report_calibration(summaries: list[dict], configs: Configs) -> None:
    """--cache-calibrate: print the measured MagCache ratios (mean over the prompts); write them as JSON."""
    runs = [s["measured_mag_ratios"] for s in summaries]
    ratios = [round(sum(values) / len(runs), 5) for values in zip(*runs, strict=True)]
    sampling = configs.sampling
    payload = {"mag_ratios": ratios, "num_steps": len(ratios), "prompts": len(runs),
               "size": [sampling.height, sampling.width, sampling.video_length]}
    print(f"MagCache ratios for {sampling.height}x{sampling.width}x{sampling.video_length}, "
          f"{len(ratios)} steps (mean over {len(runs)} prompt(s)): {json.dumps(ratios)}")
    if configs.cache.calibrate_path:
        path = write_sidecar(configs.cache.calibrate_path, payload, overwrite=True)  # atomic JSON
        logger.info("MagCache ratios written to %s (use with --cache magcache --cache-ratios %s)", path, path)


def rewrite_prompts_for_run(configs: Configs, state, *, sampler=None) -> list[RewriteResult]:
    """--prompt-rewrite: every prompt rewritten once, before any is encoded or any file is written.

    Rank 0 rewrites (with the server, or with `sampler`'s LLM text encoder when there is no endpoint) and
    sends the texts, or its one-line failure, to the other ranks, so all ranks encode the same prompts.
    """
    from hyvideo.prompt_rewrite import rewrite_prompts

    rewrite = configs.rewrite
    payload: tuple[str, object] = ("pending", None)
    if state.is_main:
        try:
            backend = _rewrite_backend(rewrite, configs, sampler)
            with sampler.pipeline.stage("text_encoder") if sampler is not None else contextlib.nullcontext():
                results = rewrite_prompts(configs.sampling.prompts, rewrite.mode, backend,
                                          fallback=rewrite.fallback)
            payload = ("ok", results)
        except RewriteError as exc:
            payload = ("error", str(exc))
    status, value = _share_from_main(payload, state)
    if status == "error":
        raise _SharedRewriteError(value)
    return value


class _SharedRewriteError(RewriteError):
    """Rank 0's rewrite failure, raised on every rank; reported once (by rank 0), not once per rank."""

    main_rank_reports = True


def _rewrite_backend(rewrite: RewriteConfig, configs: Configs, sampler):
    from hyvideo.prompt_rewrite import (
        DEFAULT_LOCAL_MAX_NEW_TOKENS,
        ChatCompletionsBackend,
        LocalLLMBackend,
        UnavailableBackend,
        load_lm_head,
    )

    if rewrite.uses_endpoint:
        return ChatCompletionsBackend(endpoint=rewrite.endpoint, model=rewrite.model, api_key=rewrite.api_key,
                                      timeout_s=rewrite.timeout_s, retries=rewrite.retries,
                                      max_tokens=rewrite.max_tokens)
    llm, device = sampler.text_encoder, sampler.pipeline.device
    try:
        lm_head = load_lm_head(configs.model.text_encoder_path, dtype=llm.dtype, device=device)
    except RewriteError as exc:
        return UnavailableBackend(name=LocalLLMBackend.name, error=exc)
    return LocalLLMBackend(text_encoder=llm, lm_head=lm_head, device=device,
                           max_new_tokens=rewrite.max_tokens or DEFAULT_LOCAL_MAX_NEW_TOKENS)


def _share_from_main(payload, state):
    """Rank 0's picklable `payload` on every rank (unchanged in one process)."""
    if not state.enabled:
        return payload
    import torch.distributed as dist

    box = [payload]
    dist.broadcast_object_list(box, src=0, device=state.comm_device)
    return box[0]


def save_outputs(
    out, configs: Configs, save_dir: Path, *, rewrite: RewriteResult | None = None,
    extra_facts: dict | None = None,
) -> list[Path]:
    """One mp4 per video, each with a JSON sidecar (and latents with --save-latents).

    `extra_facts` go into every sidecar too (e.g. the server's job id).

    With a prompt rewrite, `out.prompt` is the rewritten prompt (the one encoded); the file is named after
    the user's prompt and the sidecar records both under "prompt_rewrite".

    A video's files are published together or not at all: if writing one fails or is interrupted, the
    files of that video already written are removed (videos completed before it stay).
    """
    time_flag = make_time_flag()
    written = []
    extra = {"prompt_rewrite": rewrite.as_record()} if rewrite is not None else {}
    if getattr(out, "step_cache", None):
        extra["step_cache"] = out.step_cache
    if getattr(out, "loras", None):
        extra["loras"] = out.loras
    for i, seed in enumerate(out.seeds):
        stem = safe_filename(rewrite.original if rewrite else out.prompt, seed=seed, time_flag=time_flag)
        path = unique_path(save_dir, stem, ".mp4", sibling_suffixes=(".json", ".safetensors"))
        record = run_record(configs, prompt=out.prompt, negative_prompt=out.negative_prompt, seed=seed,
                            size=out.size, timings=out.timings, **extra, **(extra_facts or {}))
        with _all_or_nothing(path) as published:
            if configs.runtime.save_latents:
                record["latents_file"] = path.with_suffix(".safetensors").name
                latents_path = path.with_suffix(".safetensors")
                published.append(save_latents(latents_path, out.latents[i : i + 1], record))
            published.append(save_video(out.samples[i], path, fps=FPS, crf=configs.runtime.crf,
                                        metadata={"comment": out.prompt}))
            published.append(write_sidecar(path, record))
        logger.info("Sample saved to: %s", path)
        written.append(path)
    return written


@contextlib.contextmanager
def _all_or_nothing(path: Path):
    """Collect the files of one output; remove them all if the block fails (OutputWriteError) or stops."""
    published: list[Path] = []
    try:
        yield published
    except BaseException as exc:
        for done in published:
            done.unlink(missing_ok=True)
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "ffmpeg" in str(exc)):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            raise OutputWriteError(f"could not write {path}: {reason}; its partial files were removed "
                                   "(free some space or choose another --save-path)") from exc
        raise


def run_record(configs: Configs, **facts) -> dict:
    """What the sidecar records: the facts of this video, every setting, and library versions."""
    import diffusers
    import transformers

    return {
        **facts,
        "settings": settings_record(configs),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "diffusers": diffusers.__version__, "python": sys.version.split()[0]},
    }


def settings_record(configs: Configs) -> dict:
    """Every setting as a dict for the sidecar, without secrets (the rewrite API key)."""
    settings = dataclasses.asdict(configs)
    settings.get("rewrite", {}).pop("api_key", None)
    return settings


def decode_saved_latents(
    configs: Configs, latents_path: Path, save_dir: Path, *, parallel=None
) -> Path | None:
    """Decode a file written with --save-latents into an mp4, without loading the DiT or text encoders.

    Under torchrun (`parallel` with several ranks) the ranks decode different VAE tiles and the main process
    writes the file; the others return None.
    """
    from hyvideo.diffusion.pipelines.pipeline_hunyuan_video import decode_latents
    from hyvideo.inference import load_vae_component
    from hyvideo.parallel.groups import default_device

    latents, record = load_latents(latents_path)
    multi = parallel is not None and parallel.enabled
    vae = load_vae_component(configs.model, parallel.device if parallel is not None else default_device(None))
    video = decode_latents(vae, latents, vae_dtype=PRECISION_TO_TYPE[configs.model.vae_precision],
                           use_autocast=not configs.runtime.disable_autocast,
                           enable_tiling=configs.model.vae_tiling, parallel=parallel)
    if multi and not parallel.is_main:
        return None
    path = unique_path(save_dir, f"{latents_path.stem}_decoded", ".mp4", sibling_suffixes=(".json",))
    with _all_or_nothing(path) as published:
        published.append(save_video(video[0], path, fps=FPS, crf=configs.runtime.crf))
        published.append(write_sidecar(path, {**record, "decoded_from": str(latents_path),
                                               "decode_settings": settings_record(configs)}))
    logger.info("Decoded video saved to: %s", path)
    return path
