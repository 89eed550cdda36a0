"""Image-to-video jobs on the server: the request field `image` (a base64 data URL), the store, the worker,
the page.

On the tiny I2V tree, in process: a job queued with an image, carried over a restart of the store, gives
the same latents as a direct `sampler.predict(reference_image=...)` with the image's bucket and the same seed
(bit-identical, CPU float32), and its sidecar records the image. Without models: a text-to-video server
refuses `image`, an image-to-video server refuses a job without one or with a `size`, and every bad image is
a 400 with one short line that queues nothing. The page turns its upload into the same request. Under
torchrun (2 gloo ranks, Ulysses 2) a live server's job matches a one-process predict with the image; in a
real browser the page uploads the first frame and the job records exactly that file.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hyvideo.config import ServerLimits, parse_server_args
from hyvideo.i2v import bucket_for_image
from hyvideo.server.api import body_limit, create_app
from hyvideo.server.images import decode_image
from hyvideo.server.service import Service
from hyvideo.server.store import DB_NAME, JobStore
from hyvideo.server.worker import JobSpec, Worker, job_image, share_spec
from hyvideo.testing.tiny import write_tiny_checkpoints
from hyvideo.utils.file_utils import load_latents
from tests.server_launch import FP32, wait_done
from tests.test_server_api import DEFAULTS
from tests.test_server_browser import browser  # noqa: F401 - the headless Chromium fixture

RESOLUTION = "360p"
JOB = ["--video-length", "5", "--infer-steps", "2", "--i2v-resolution", RESOLUTION, "--no-vae-tiling"]


def png_bytes(width: int = 64, height: int = 48, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x * 7 + y * 3) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"



# --------------------------------------------------------------------------------------------------
# End to end on the tiny I2V tree
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def i2v_tree(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"), i2v=True)


def test_queued_image_job_survives_a_restart_and_equals_a_direct_predict(i2v_tree, tmp_path):
    from hyvideo.inference import HunyuanVideoSampler

    save = tmp_path / "out"
    save.mkdir()
    # --i2v-stability: the worker must pass the server's flag too (it changes the initial latents).
    configs, server = parse_server_args(["--model-base", str(i2v_tree), "--i2v-mode", "--i2v-stability",
                                         "--save-path", str(save), "--save-latents", *FP32, *JOB])
    assert configs.i2v.enabled and configs.i2v.image_path is None  # no --i2v-image-path on the server
    data = png_bytes()
    first = JobStore(save / DB_NAME)  # 1. queued by a server that stops before running it
    service = Service(store=first, defaults=configs.sampling, limits=server.limits, save_dir=save,
                      i2v_resolution=RESOLUTION)
    answer = TestClient(create_app(service)).post("/v1/videos", json={"prompt": "a ball rolls", "seed": 5,
                                                                      "image": data_url(data)})
    assert answer.status_code == 200, answer.text
    job_id, (height, width) = answer.json()["id"], bucket_for_image(48, 64, RESOLUTION)
    assert answer.json()["size"] == f"{width}x{height}"
    first.close()

    store = JobStore(save / DB_NAME)  # 2. the restart: the queued job and its image are still there
    assert store.recover_interrupted() == [] and store.image(job_id) == data
    sampler = HunyuanVideoSampler.from_pretrained(configs)
    worker = Worker(store, sampler, configs, save)
    worker.start()
    try:
        job = wait_done(store, job_id)
    finally:
        worker.stop(timeout=120)
    assert job.status == "completed", (job.error_code, job.error_message)
    assert store.image(job_id) is None  # dropped once done: the sidecar keeps its sha256
    store.close()
    sidecar = json.loads((save / job.outputs[0]).with_suffix(".json").read_text())
    served = load_latents(save / sidecar["latents_file"])[0]

    s = configs.sampling
    direct = sampler.predict("a ball rolls", height=height, width=width, video_length=s.video_length, seed=5,
                             infer_steps=s.infer_steps, guidance_scale=s.cfg_scale, flow_shift=s.flow_shift,
                             flow_reverse=s.flow_reverse, embedded_guidance_scale=s.embedded_cfg_scale
                             if sampler.transformer.config.guidance_embed else None, enable_tiling=False,
                             show_progress=False, reference_image=Image.open(io.BytesIO(data)).convert("RGB"),
                             i2v_stability=True).latents
    assert served.shape[-2:] == (height // 8, width // 8)
    assert served.equal(direct)  # bit-identical: same bytes, bucket, seed and stability
    record = sidecar["reference_image"]
    assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["bucket"] == [height, width]
    assert (record["width"], record["height"], record["format"], record["resolution"]) == (64, 48, "PNG",
                                                                                          RESOLUTION)
    sampling = sidecar["settings"]["sampling"]
    assert (sampling["height"], sampling["width"]) == (height, width)
    assert sidecar["settings"]["i2v"]["enabled"] and sidecar["settings"]["i2v"]["stability"]


def test_jobs_from_the_other_mode_fail_alone(tmp_path):
    """A job queued before a restart into the other mode, or whose image is gone, fails without running."""
    store = JobStore(tmp_path / DB_NAME)
    i2v = Service(store=store, defaults=DEFAULTS, limits=ServerLimits(), save_dir=tmp_path,
                  i2v_resolution=RESOLUTION)
    with_image = i2v.submit({"prompt": "a cat", "image": data_url(png_bytes())})
    plain = store.add({"prompt": "a cat", "features": {}}, max_queue=10)
    assert job_image(store, with_image, True) == png_bytes()
    with pytest.raises(ValueError, match="now runs text-to-video"):
        job_image(store, with_image, False)
    with pytest.raises(ValueError, match="has no image but the server now runs image-to-video"):
        job_image(store, plain, True)
    assert job_image(store, plain, False) is None
    store._drop_image(with_image.id)
    with pytest.raises(ValueError, match="image is missing"):
        job_image(store, with_image, True)
    store.close()


def test_store_keeps_a_queued_image_and_drops_it_when_the_job_ends(tmp_path):
    store = JobStore(tmp_path / DB_NAME)
    names = ("done", "cancelled", "failed", "running", "queued")
    ids = [store.add({"prompt": p, "steps": 2}, max_queue=9, image=p.encode() * 1000).id for p in names]
    assert store.claim_next().id == ids[0]
    store.complete(ids[0], ["x.mp4"])
    store.request_cancel(ids[1])
    assert store.claim_next().id == ids[2]
    store.fail(ids[2], "error", "boom")
    assert store.claim_next().id == ids[3]  # running when the server dies
    assert [store.image(i) for i in ids] == [None, None, None, b"running" * 1000, b"queued" * 1000]
    store.close()
    reopened = JobStore(tmp_path / DB_NAME)
    assert reopened.recover_interrupted() == [ids[3]]
    assert [reopened.image(i) for i in ids] == [None, None, None, None, b"queued" * 1000]
    reopened.close()


def test_every_rank_gets_the_same_image_bytes(tmp_path):
    """The JobSpec broadcast (gloo, one process: the object is pickled and unpickled) carries the image."""
    import torch
    import torch.distributed as dist

    spec = JobSpec("run", "video_x", {"prompt": "a cat"}, 3, None, png_bytes(300, 200))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        got = share_spec(spec, type("Parallel", (), {"comm_device": torch.device("cpu")})())
    finally:
        dist.destroy_process_group()
    assert got == spec and got.image == png_bytes(300, 200)


# --------------------------------------------------------------------------------------------------
# Requests (no models)
# --------------------------------------------------------------------------------------------------

SMALL = ServerLimits(max_image_bytes=50_000, max_image_side=1000)


@pytest.fixture
def i2v_service(tmp_path) -> Service:
    store = JobStore(tmp_path / DB_NAME)
    yield Service(store=store, defaults=DEFAULTS, limits=SMALL, save_dir=tmp_path, i2v_resolution=RESOLUTION)
    store.close()


def test_text_to_video_server_refuses_an_image(tmp_path):
    store = JobStore(tmp_path / DB_NAME)
    client = TestClient(create_app(Service(store=store, defaults=DEFAULTS, limits=SMALL, save_dir=tmp_path)))
    answer = client.post("/v1/videos", json={"prompt": "a cat", "image": data_url(png_bytes())})
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == ("image: this server runs text-to-video; an image is only "
                                                 "taken by a server started with --i2v-mode")
    assert client.get("/v1/server").json()["i2v"] is None and store.list() == []
    store.close()


NOISE = np.random.default_rng(0).integers(0, 256, (140, 140, 3), dtype=np.uint8)  # ~59 kB as PNG


def _encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


BAD_IMAGES = [
    ({}, "image is needed: this server runs image-to-video"),
    ({"image": None}, "image is needed"),
    ({"image": 42}, "image must be a string: a data URL"),
    ({"image": base64.b64encode(png_bytes()).decode()}, "image must be a data URL: data:image/png;base64"),
    ({"image": "https://example.com/cat.png"}, "image must be a data URL"),
    ({"image": data_url(png_bytes(), "text/plain")}, "media type 'text/plain' is not offered"),
    ({"image": data_url(png_bytes(), "image/gif")}, "media type 'image/gif' is not offered"),
    ({"image": "data:image/png," + "x" * 100}, "must be base64-encoded"),
    ({"image": "data:image/png;base64,not*base64!"}, "payload is not valid base64"),
    ({"image": "data:image/png;base64,"}, "the data URL is empty"),
    ({"image": data_url(b"not an image at all")}, "not a readable PNG/JPEG/WebP image"),
    ({"image": data_url(png_bytes(fmt="BMP"))}, "not a readable PNG/JPEG/WebP image"),
    ({"image": data_url(png_bytes()[:200])}, "not a readable PNG/JPEG/WebP image"),  # truncated
    ({"image": data_url(_encoded(NOISE))}, "image is over 50,000 bytes (--max-image-bytes)"),
    ({"image": data_url(png_bytes(1001, 16))}, "image is 1001x16; each side may have at most 1000 pixels"),
    ({"image": data_url(png_bytes(64, 8))}, "image is 64x8; each side needs >= 16 pixels"),
    ({"image": data_url(png_bytes()), "size": "64x48"}, "size: on this image-to-video server the video size"),
    ({"image": data_url(png_bytes()), "frames": 1}, "frames: image-to-video makes videos"),
    ({"image": data_url(png_bytes()), "prompt": "<image> a cat"}, "must not contain the text <image>"),
]


@pytest.mark.parametrize(("body", "message"), BAD_IMAGES, ids=[m[:40] for _, m in BAD_IMAGES])
def test_bad_images_get_400_one_line_and_queue_nothing(i2v_service, body, message):
    answer = TestClient(create_app(i2v_service)).post("/v1/videos", json={"prompt": "a cat", **body})
    assert answer.status_code == 400, answer.text
    text = answer.json()["error"]["message"]
    assert message in text and "\n" not in text and len(text) < 200, text
    assert i2v_service.store.list() == []


def test_the_body_limit_makes_room_for_an_image_within_its_limit(i2v_service):
    """An I2V server's body may hold --max-image-bytes as base64 beside the other fields; not a byte more."""
    limit = 64 * 1024 + 4 * (SMALL.max_image_bytes // 3 + 1) + 64
    assert body_limit(i2v_service) == limit
    client = TestClient(create_app(i2v_service))
    for size, status in ((limit + 1, 413), (limit - 100, 400)):  # 400: the image check's turn
        body = json.dumps({"prompt": "a cat", "image": "data:image/png;base64,"}).encode()
        body = body.replace(b"base64,", b"base64," + b"A" * (size - len(body)))
        answer = client.post("/v1/videos", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == status and len(answer.json()["error"]["message"]) < 100, answer.text
    assert i2v_service.store.list() == []


def test_good_images_json_form_and_multipart(i2v_service):
    """PNG, JPEG, WebP, odd modes and animations as the CLI's loader takes them; form and multipart too."""
    client = TestClient(create_app(i2v_service))
    info = client.get("/v1/server").json()
    assert info["i2v"] == {"resolution": RESOLUTION} and info["limits"]["max_image_side"] == 1000
    for data, media in ((png_bytes(), "image/png"), (png_bytes(fmt="JPEG"), "image/jpeg"),
                        (png_bytes(fmt="WEBP"), "image/webp"), (png_bytes(mode="RGBA"), "image/png"),
                        (png_bytes(mode="P"), "image/png"), (png_bytes(mode="L"), "image/png")):
        answer = client.post("/v1/videos", json={"prompt": "a cat", "image": data_url(data, media)})
        assert answer.status_code == 200, (media, answer.text)
        record = answer.json()["request"]["features"]["image"]
        assert record["sha256"] == hashlib.sha256(data).hexdigest() and "data" not in json.dumps(record)
    form = client.post("/v1/videos", data={"prompt": "a cat", "steps": "2", "image": data_url(png_bytes())})
    assert form.status_code == 200, form.text
    # multipart: Starlette's default part limit is 1 MiB; an image field may be larger (here ~1.2 MB)
    i2v_service.limits = dataclasses.replace(SMALL, max_image_bytes=2_000_000)
    big = _encoded(np.random.default_rng(1).integers(0, 256, (640, 640, 3), dtype=np.uint8))
    assert len(big) > 1024 * 1024
    boundary = "hyvideoboundary"
    body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                   for k, v in (("prompt", "a cat"), ("image", data_url(big)))) + f"--{boundary}--\r\n"
    multi = client.post("/v1/videos", content=body.encode(),
                        headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert multi.status_code == 200, multi.text
    assert i2v_service.store.image(multi.json()["id"]) == big
    assert len(i2v_service.store.list()) == 8


def test_animated_and_odd_modes_decode_as_the_cli_loader_does(tmp_path):
    from hyvideo.i2v import load_reference_image

    frames = [Image.new("RGB", (32, 32), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    for data in (buffer.getvalue(), png_bytes(mode="RGBA"), png_bytes(mode="P")):
        path = tmp_path / "image"
        path.write_bytes(data)
        ours, cli = decode_image(data), load_reference_image(path)
        assert ours.mode == "RGB" and np.array_equal(np.asarray(ours), np.asarray(cli))
    assert decode_image(buffer.getvalue()).getpixel((5, 5)) == (255, 0, 0)  # the first frame
    # The worker decodes without the side limit: a job keeps what it was accepted with, across restarts.
    assert decode_image(png_bytes(1200, 16)).size == (1200, 16)
    with pytest.raises(ValueError, match="at most 1000 pixels"):
        decode_image(png_bytes(1200, 16), SMALL)


def test_server_flags_take_i2v_mode_without_an_image_path(i2v_tree, tmp_path, capsys):
    configs, _ = parse_server_args(["--model-base", str(i2v_tree), "--i2v-mode", "--max-image-side", "2048"])
    assert configs.i2v.enabled and parse_server_args(["--i2v-mode", "--max-image-side", "2048"])[1] \
        .limits.max_image_side == 2048
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes())
    with pytest.raises(SystemExit):
        parse_server_args(["--i2v-mode", "--i2v-image-path", str(image)])
    assert "--i2v-image-path is not a server flag" in capsys.readouterr().err


def test_without_weights_an_i2v_server_falls_back_to_a_tiny_i2v_tree(tmp_path, monkeypatch):
    from hyvideo.server.main import TINY_TREE_I2V, choose_weights

    monkeypatch.chdir(tmp_path)  # no ckpts/ here, and the tiny trees are written under .cache/
    for name in ("MODEL_BASE", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    configs, is_tiny = choose_weights(*parse_server_args(["--i2v-mode"]))
    assert is_tiny and configs.model.model_base == TINY_TREE_I2V
    assert configs.model.dit_weight_path.is_file() and "i2v" in str(configs.model.dit_weight_path)


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------


def test_page_shows_the_image_input_on_i2v_only_and_sends_its_image(i2v_service, tmp_path):
    import gradio as gr

    from hyvideo.server.page import _generate_handler, build_page, page_request

    def image_inputs(service):
        return [b for b in build_page(service).blocks.values() if isinstance(b, gr.Image)]

    (shown,) = image_inputs(i2v_service)
    assert shown.visible and RESOLUTION in shown.label
    store = JobStore(tmp_path / "t2v.sqlite3")
    (hidden,) = image_inputs(Service(store=store, defaults=DEFAULTS, limits=SMALL, save_dir=tmp_path))
    assert not hidden.visible
    store.close()
    upload = tmp_path / "upload.png"
    upload.write_bytes(png_bytes())
    form = ("a cat", "", 64, 48, 5, 2, "7", 6.0, 1.0, 7.0, 1, "none")
    body = page_request((*form, str(upload)), [], i2v=True)
    assert body["image"] == data_url(png_bytes()) and "size" not in body and body["seed"] == 7
    assert "image" not in page_request(form, [], i2v=False) and page_request(form, [], i2v=False)["size"]
    gif = tmp_path / "upload.gif"  # not one of the server's formats: re-encoded as PNG, same pixels
    Image.open(io.BytesIO(png_bytes())).convert("P").save(gif)
    sent = page_request((*form, str(gif)), [], i2v=True)["image"]
    assert sent.startswith("data:image/png;base64,")
    assert np.array_equal(np.asarray(decode_image(base64.b64decode(sent.split(",", 1)[1]))),
                          np.asarray(Image.open(gif).convert("RGB")))
    with pytest.raises(gr.Error, match="image is needed"):
        next(_generate_handler(i2v_service, [], i2v=True)(*form, None))
    first = next(_generate_handler(i2v_service, [], i2v=True)(*form, str(upload)))
    (job,) = i2v_service.store.list()
    assert first[0] == job.id and i2v_service.store.image(job.id) == png_bytes()


# --------------------------------------------------------------------------------------------------
# torchrun: every rank must sample with the job's image
# --------------------------------------------------------------------------------------------------


@pytest.mark.multigpu
def test_torchrun_ranks_sample_the_jobs_image(i2v_tree, tmp_path):
    """Ulysses 2 (gloo, CPU): a rank without the image (or with another) would change the video."""
    from hyvideo.inference import HunyuanVideoSampler
    from tests.helpers import rel_err
    from tests.server_launch import LiveServer

    save = tmp_path / "out"
    flags = ("--ulysses-degree", "2", "--i2v-mode", "--save-latents", *JOB)
    server = LiveServer(i2v_tree, save, nproc=2, extra=flags).wait_ready()
    try:
        created = server.client.post("/v1/videos", json={"prompt": "a ball rolls", "seed": 5,
                                                         "image": data_url(png_bytes())}).json()
        job = server.wait_job(created["id"])
        assert job["status"] == "completed", server.tail()
    finally:
        server.stop()
    sidecar = json.loads((save / job["files"][0]).with_suffix(".json").read_text())
    assert sidecar["settings"]["runtime"]["world_size"] == 2
    served = load_latents(save / sidecar["latents_file"])[0]
    configs, _ = parse_server_args(["--model-base", str(i2v_tree), "--i2v-mode", *FP32, *JOB])
    sampler = HunyuanVideoSampler.from_pretrained(configs)  # one process: the reference
    s, (height, width) = configs.sampling, bucket_for_image(48, 64, RESOLUTION)
    image = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    kwargs = dict(height=height, width=width, video_length=s.video_length, seed=5, infer_steps=s.infer_steps,
                  flow_shift=s.flow_shift, flow_reverse=s.flow_reverse, guidance_scale=s.cfg_scale,
                  embedded_guidance_scale=s.embedded_cfg_scale
                  if sampler.transformer.config.guidance_embed else None, enable_tiling=False,
                  show_progress=False)
    direct = sampler.predict("a ball rolls", reference_image=image, **kwargs).latents
    other = sampler.predict("a ball rolls", reference_image=image.transpose(Image.FLIP_LEFT_RIGHT),
                            **kwargs).latents
    assert rel_err(other, direct) > 1e-2  # the image matters far more than the tolerance below
    assert rel_err(served, direct) <= 1e-5


@pytest.mark.browser
def test_browser_page_uploads_the_first_frame(browser, i2v_tree, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.server_launch import LiveServer

    save, upload = tmp_path / "out", tmp_path / "first.png"
    upload.write_bytes(png_bytes())
    server = LiveServer(i2v_tree, save, extra=("--i2v-mode", *JOB)).wait_ready()
    wait = WebDriverWait(browser, 120)
    try:
        browser.get(server.url + "/")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        hidden = browser.find_elements(By.CSS_SELECTOR, "#width input")  # the bucket decides: not shown
        assert not any(e.is_displayed() for e in hidden)
        browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(upload))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
        browser.find_element(By.ID, "generate").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#result video[src]")))
        (job,) = server.client.get("/v1/videos").json()["data"]
    finally:
        server.stop()
    record = job["request"]["features"]["image"]
    assert (record["width"], record["height"]) == (64, 48) and job["status"] == "completed"
    assert record["sha256"] == hashlib.sha256(png_bytes()).hexdigest()  # the uploaded file, unconverted
    height, width = bucket_for_image(48, 64, RESOLUTION)
    assert job["size"] == f"{width}x{height}"
