"""gradio_server.py's work: pick the weights, load the sampler once, start the worker, serve HTTP.

Order: checks that need no models (output folder, free port) fail in seconds with one line and status 2;
then the models load (every rank under torchrun); then rank 0 serves the page and the API while the other
ranks follow rank 0's jobs (hyvideo/server/worker.py). Stopping the server (Ctrl-C, SIGTERM) ends the
running job as `interrupted` and keeps the queued ones for the next start.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import sys
import time
from pathlib import Path

from hyvideo.config import Configs, ServerConfig, build_parser
from hyvideo.runner import USER_ERRORS, _setup_logging
from hyvideo.server.service import TINY_BANNER, Service
from hyvideo.server.store import DB_NAME, JobStore

logger = logging.getLogger(__name__)

TINY_TREE = Path(".cache/ckpts-tiny")  # the same tree scripts/quickstart.sh writes
# --i2v-mode: the tiny tree with the I2V DiT and LLaVA too, in a folder of its own (a T2V tree already
# written under TINY_TREE has its marker, so it could not say whether the I2V part is there).
TINY_TREE_I2V = Path(".cache/ckpts-tiny-i2v")
# With the tiny tree and the CLI's default sampling flags, jobs default to this (seconds on a CPU).
TINY_DEFAULTS = {"height": 128, "width": 128, "video_length": 17, "infer_steps": 10}
TINY_WAIT_S = 300  # other ranks wait this long for local rank 0 to write the tiny tree


def serve(configs: Configs, server: ServerConfig) -> int:
    """Run the server until it is stopped; return the exit status."""
    runtime = configs.runtime
    _setup_logging(runtime)
    try:
        configs, tiny = choose_weights(configs, server)
        from hyvideo.utils.file_utils import check_writable_dir

        save_dir = check_writable_dir(runtime.save_path)
        if runtime.is_main_process:
            check_port_free(server.host, server.port)
        if tiny:
            logger.warning("=" * 20 + " " + TINY_BANNER)
        if configs.rewrite.enabled:
            raise ValueError("--prompt-rewrite is not offered by the server yet: rewrite prompts with "
                             "sample_video.py, or leave the flag out")
        from hyvideo.inference import HunyuanVideoSampler, check_parallel_layout, init_parallel, prepare_loras

        layout = check_parallel_layout(configs)  # chosen here when no degree was given
        configs = dataclasses.replace(configs, runtime=dataclasses.replace(
            runtime, ulysses_degree=layout.ulysses_degree, ring_degree=layout.ring_degree))
        loras = prepare_loras(configs.model)  # --lora: applied to every job, checked before loading
        groups = init_parallel(configs.runtime, layout)
        state = groups.world  # jobs and cancel flags travel over every rank
        sampler = HunyuanVideoSampler.from_pretrained(configs, parallel=groups,
                                                      use_autocast=not runtime.disable_autocast)
        for weights, scale in loras:  # every rank applies the same LoRAs
            sampler.add_lora(weights, scale)
        # name -> start-up scale, in load order: what a job's "loras" may change (README "Web server")
        lora_scales = {weights.name: float(scale) for weights, scale in loras}
    except USER_ERRORS as exc:  # every rank finds the same fault (flags, files): one line per node
        if runtime.local_rank == 0:
            print(f"gradio_server.py: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if not runtime.is_main_process:
        from hyvideo.server.worker import follow_rank0

        follow_rank0(sampler, configs, state)
        return 0
    _serve_rank0(configs, server, sampler, state, save_dir, tiny, lora_scales)
    return 0


def _serve_rank0(configs: Configs, server: ServerConfig, sampler, state, save_dir: Path, tiny: bool,
                 lora_scales: dict[str, float]) -> None:
    import uvicorn

    from hyvideo.server.worker import Worker

    store = JobStore(save_dir / DB_NAME)
    interrupted = store.recover_interrupted()
    if interrupted:
        logger.warning("Marked %d job(s) interrupted by the last stop as failed: %s", len(interrupted),
                       ", ".join(interrupted))
    worker = Worker(store, sampler, configs, save_dir, parallel=state, loras=lora_scales)
    service = Service(store=store, defaults=configs.sampling, limits=server.limits, save_dir=save_dir,
                      wake=worker.wake, tiny_weights=tiny, token=server.token,
                      cache_policy=configs.cache.policy, loras=lora_scales,
                      i2v_resolution=configs.i2v.resolution if configs.i2v.enabled else None)
    app = build_app(service)
    worker.start()
    logger.info("Serving on http://%s:%d/ (API: /v1/videos, auth: %s)", server.host, server.port,
                "bearer token" if server.token else "none")
    try:
        uvicorn.run(app, host=server.host, port=server.port, log_level="warning")
    finally:
        worker.stop(timeout=60)
        store.close()


def build_app(service: Service):
    """The FastAPI app: /v1 API plus the Gradio page at /."""
    import gradio as gr

    from hyvideo.server.api import create_app
    from hyvideo.server.page import build_page

    app = create_app(service)
    auth = (lambda user, password: password == service.token) if service.token else None
    return gr.mount_gradio_app(app, build_page(service), path="/", allowed_paths=[str(service.save_dir)],
                               auth=auth, auth_message="Password: the server's HYVIDEO_SERVER_TOKEN",
                               footer_links=["api"])


def choose_weights(configs: Configs, server: ServerConfig) -> tuple[Configs, bool]:
    """The configs to load, and whether they point at the tiny random-weight tree.

    No weights under the default --model-base: fall back to the tiny tree (written on first use) so the
    server starts on a fresh machine, with a banner saying so. An explicit --model-base without weights is
    an error, as in the CLI.
    """
    from hyvideo.testing.tiny import is_tiny_tree

    model = configs.model
    fallback = not model.dit_weight_path.exists() and model.dit_weight is None and not server.model_base_given
    if fallback:
        tree = TINY_TREE_I2V if configs.i2v.enabled else TINY_TREE
        _ensure_tiny_tree(tree, configs.runtime.local_rank, i2v=configs.i2v.enabled)
        configs = dataclasses.replace(configs, model=dataclasses.replace(model, model_base=tree))
    if not is_tiny_tree(configs.model.model_base):
        return configs, False
    return _tiny_defaults(configs), True


def _ensure_tiny_tree(root: Path, local_rank: int, *, i2v: bool = False) -> None:
    from hyvideo.testing.tiny import MARKER_FILE, write_tiny_checkpoints

    if (root / MARKER_FILE).is_file():
        return
    if local_rank == 0:
        logger.warning("No weights under --model-base: writing the tiny random-weight tree to %s", root)
        write_tiny_checkpoints(root, i2v=i2v)  # the marker file is written last
        return
    deadline = time.monotonic() + TINY_WAIT_S
    while not (root / MARKER_FILE).is_file():
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"{root / MARKER_FILE} did not appear: run "
                                    f"scripts/make_tiny_ckpts.py {root}")
        time.sleep(0.5)


def _tiny_defaults(configs: Configs) -> Configs:
    """Small default jobs and fp32 text encoders / VAE on the tiny tree, where the flags were left alone."""
    defaults = build_parser().parse_args([])
    sampling, model = configs.sampling, configs.model
    if (sampling.height, sampling.width) == tuple(defaults.video_size) and \
            sampling.video_length == defaults.video_length and sampling.infer_steps == defaults.infer_steps:
        sampling = dataclasses.replace(sampling, **TINY_DEFAULTS)
    names = ("vae_precision", "text_encoder_precision", "text_encoder_precision_2")
    precisions = {name: "fp32" for name in names if getattr(model, name) == getattr(defaults, name)}
    return dataclasses.replace(configs, sampling=sampling, model=dataclasses.replace(model, **precisions))


def check_port_free(host: str, port: int) -> None:
    """Fail before loading models when the address cannot be bound (taken, or not an address of ours)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another "
                         "--server-port (or $SERVER_PORT), or stop the program using it") from None
