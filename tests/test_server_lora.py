"""Per-job LoRA scales on the server: the request field `loras`, the worker, the page, torchrun.

In process on the tiny tree with two random LoRAs loaded at start-up: a job's scales give the same latents
as a direct `sampler.predict` with those scales (bit-identical, CPU float32), the next job gets the start-up
scales back, and the sidecars record what was applied. Every bad `loras` is a 400 with one line. The page
builds one number per LoRA and puts them in the request. A real browser and a torchrun launch (2 ranks, every
rank must apply the job's scales) run against live servers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from hyvideo.config import ServerLimits, parse_server_args
from hyvideo.modules import HYVideoDiffusionTransformer
from hyvideo.server.api import create_app
from hyvideo.server.schema import MAX_LORA_SCALE, parse_request
from hyvideo.server.service import Service
from hyvideo.server.store import DB_NAME, JobStore
from hyvideo.server.worker import Worker, job_lora_scales
from hyvideo.testing.loras import random_diffusers_lora, to_kohya_layout, to_original_layout
from hyvideo.testing.tiny import TINY_DIT, write_tiny_checkpoints
from hyvideo.utils.file_utils import load_latents
from tests.helpers import rel_err
from tests.server_launch import FP32, SMALL_JOB, LiveServer, wait_done
from tests.test_server_api import DEFAULTS
from tests.test_server_browser import _set, browser  # noqa: F401 - the headless Chromium fixture

STARTUP = {"style": 0.7, "detail": -0.5}  # the --lora scales the servers here start with, in load order
SIZE = ["--video-size", "32", "32", "--video-length", "1", "--infer-steps", "2"]


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    """Two random LoRAs for the tiny DiT (original and kohya layouts), named by their file stems."""
    folder = tmp_path_factory.mktemp("loras")
    meta = HYVideoDiffusionTransformer(TINY_DIT, device="meta")
    style = to_original_layout(random_diffusers_lora(meta, rank=4, std=0.3, seed=1), meta)
    detail = to_kohya_layout(random_diffusers_lora(meta, rank=2, std=0.3, seed=2,
                                                   select=lambda n: "double_blocks" in n), meta, alpha=1.0)
    paths = {}
    for name, tensors in (("style", style), ("detail", detail)):
        paths[name] = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(paths[name]))
    return paths


def lora_flags(lora_files: dict[str, Path]) -> list[str]:
    return [flag for name, scale in STARTUP.items() for flag in ("--lora", f"{lora_files[name]}:{scale}")]


def predict_latents(sampler, configs, seed: int) -> torch.Tensor:
    """A direct sampler run with the server's default job (what the worker asks for a request with no
    sampling fields)."""
    s = configs.sampling
    return sampler.predict("a red ball", height=s.height, width=s.width, video_length=s.video_length,
                           seed=seed, infer_steps=s.infer_steps, guidance_scale=s.cfg_scale,
                           flow_shift=s.flow_shift, flow_reverse=s.flow_reverse,
                           embedded_guidance_scale=s.embedded_cfg_scale, show_progress=False).latents



def job_output(save: Path, job) -> tuple[torch.Tensor, dict]:
    assert job.status == "completed", (job.error_code, job.error_message)
    sidecar = json.loads((save / job.outputs[0]).with_suffix(".json").read_text())
    return load_latents(save / sidecar["latents_file"])[0], sidecar


def applied(sidecar: dict) -> tuple[list, list]:
    """(name, scale) per LoRA from the sidecar's "loras" (the sampler's records) and its settings."""
    return ([(r["name"], r["scale"]) for r in sidecar["loras"]],
            [(Path(r["path"]).stem, r["scale"]) for r in sidecar["settings"]["model"]["loras"]])


# --------------------------------------------------------------------------------------------------
# Per-job scales through the API, the queue and the worker (in process)
# --------------------------------------------------------------------------------------------------


def test_job_scales_equal_direct_runs_and_never_leak_into_the_next_job(tiny_tree, lora_files, tmp_path):
    from hyvideo.inference import HunyuanVideoSampler, prepare_loras

    save = tmp_path / "out"
    save.mkdir()
    configs, server = parse_server_args(["--model-base", str(tiny_tree), "--save-path", str(save), *FP32,
                                         *SIZE, "--save-latents", *lora_flags(lora_files)])
    loras = prepare_loras(configs.model)  # as gradio_server.py loads them
    sampler = HunyuanVideoSampler.from_pretrained(configs)
    for weights, scale in loras:
        sampler.add_lora(weights, scale)
    startup = {weights.name: float(scale) for weights, scale in loras}
    assert startup == STARTUP  # the names are the file stems
    both = predict_latents(sampler, configs, seed=3)  # the start-up scales

    store = JobStore(save / DB_NAME)
    worker = Worker(store, sampler, configs, save, loras=startup)
    service = Service(store=store, defaults=configs.sampling, limits=server.limits, save_dir=save,
                      wake=worker.wake, loras=startup)
    api = TestClient(create_app(service))
    assert api.get("/v1/server").json()["loras"] == STARTUP
    ids = [api.post("/v1/videos", json={"prompt": "a red ball", "seed": 3, **extra}).json()["id"]
           for extra in ({"loras": {"style": 0}}, {})]
    # A job queued before a restart with other --lora flags names a LoRA this server lacks: it fails alone.
    stale = store.add({**parse_request({"prompt": "x"}, configs.sampling, server.limits).to_dict(),
                       "features": {"loras": {"gone": 1.0}}}, max_queue=10)
    worker.start()
    try:
        without_style, plain = (job_output(save, wait_done(store, i)) for i in ids)
        failed = wait_done(store, stale.id)
    finally:
        worker.stop(timeout=60)
        store.close()
    assert failed.status == "failed" and "gone are not loaded on this server" in failed.error_message

    sampler.unload_loras()  # a server started with --lora detail only
    sampler.add_lora(loras[1][0], STARTUP["detail"])
    only_detail = predict_latents(sampler, configs, seed=3)
    assert torch.equal(without_style[0], only_detail)  # {"style": 0} = the LoRA not loaded at all
    assert torch.equal(plain[0], both)  # the next job: start-up scales again, bit for bit
    assert not torch.allclose(only_detail, both, atol=1e-3)  # and the LoRA does change the result
    asked = [("style", 0.0), ("detail", -0.5)]
    assert applied(without_style[1]) == (asked, asked)  # the sampler's records and the settings agree
    assert applied(plain[1]) == (list(STARTUP.items()), list(STARTUP.items()))


def test_job_lora_scales_always_name_every_loaded_lora():
    assert job_lora_scales(STARTUP, {}) == STARTUP
    assert job_lora_scales(STARTUP, {"loras": {}}) == STARTUP
    assert list(job_lora_scales(STARTUP, {"loras": {"detail": 2.0}}).items()) == [("style", 0.7),
                                                                                 ("detail", 2.0)]
    assert job_lora_scales({}, {}) is None
    with pytest.raises(ValueError, match="restarted with other --lora flags"):
        job_lora_scales({}, {"loras": {"style": 1.0}})


# --------------------------------------------------------------------------------------------------
# Validation (no models)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path) -> Service:
    store = JobStore(tmp_path / DB_NAME)
    yield Service(store=store, defaults=DEFAULTS, limits=ServerLimits(), save_dir=tmp_path,
                  loras=dict(STARTUP))
    store.close()


BAD_LORAS = [
    (["style"], "loras must be an object mapping a LoRA name to a scale, e.g. {\"name\": 0.8}, got a list"),
    ("style:0.5", "loras must be an object mapping a LoRA name to a scale"),
    (3, "loras must be an object mapping a LoRA name to a scale, e.g. {\"name\": 0.8}, got an integer"),
    ({"anime": 1}, "loras: unknown LoRA 'anime'; this server has style, detail"),
    ({"../../loras/style.safetensors": 1}, "loras: unknown LoRA '../../loras/style.safetensors'"),
    ({"/tmp/evil.safetensors": 1}, "loras: unknown LoRA '/tmp/evil.safetensors'"),
    ({"style.safetensors": 1}, "unknown LoRA 'style.safetensors'"),
    ({"Style": 1}, "unknown LoRA 'Style'"),
    ({"x" * 5000: 1}, "loras: unknown LoRA 'xxxxxxxx"),
    ({"style": "0.5"}, "loras: the scale of style must be a finite number, got a string '0.5'"),
    ({"style": True}, "the scale of style must be a finite number, got a boolean"),
    ({"style": None}, "the scale of style must be a finite number, got null"),
    ({"style": [1]}, "the scale of style must be a finite number, got a list"),
    ({"style": {"scale": 1}}, "the scale of style must be a finite number, got an object"),
    ({"detail": 10.5}, f"loras: the scale of detail must be between -{MAX_LORA_SCALE:g} and "
                       f"{MAX_LORA_SCALE:g}, got 10.5"),
    ({"detail": -1e6}, "the scale of detail must be between -10 and 10, got -1000000.0"),
    ({"style": 1, "detail": 1, "third": 1}, "loras has 3 entries but the server has 2 LoRAs: style, detail"),
]


@pytest.mark.parametrize(("loras", "message"), BAD_LORAS, ids=[f"{i}:{m[:40]}" for i, (_, m) in
                                                                enumerate(BAD_LORAS)])
def test_bad_loras_get_400_with_one_line_and_queue_nothing(service, loras, message):
    answer = TestClient(create_app(service)).post("/v1/videos", json={"prompt": "a cat", "loras": loras})
    assert answer.status_code == 400, answer.text
    text = answer.json()["error"]["message"]
    assert message in text and "\n" not in text and len(text) < 200, text
    assert service.store.list() == []


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"1" + b"0" * 400])
def test_non_finite_scales_get_400_not_500(service, raw):
    """Python's json reads NaN, Infinity and 1e400 (inf); a 400-digit integer overflows a float."""
    body = b'{"prompt": "a cat", "loras": {"style": ' + raw + b"}}"
    client = TestClient(create_app(service))
    answer = client.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert "the scale of style must be a finite number" in answer.json()["error"]["message"]
    other = body.replace(b'"loras": {"style": ' + raw + b"}", b'"guidance_scale": ' + raw)
    answer = client.post("/v1/videos", content=other, headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert "guidance_scale must be a number" in answer.json()["error"]["message"]
    assert service.store.list() == []


def test_server_without_loras_says_how_to_load_some(tmp_path):
    store = JobStore(tmp_path / DB_NAME)
    client = TestClient(create_app(Service(store=store, defaults=DEFAULTS, limits=ServerLimits(),
                                           save_dir=tmp_path)))
    answer = client.post("/v1/videos", json={"prompt": "a cat", "loras": {"style": 1}})
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == ("loras: this server has no LoRAs loaded; start it with "
                                                 "--lora PATH[:SCALE] to offer some")
    assert client.get("/v1/server").json()["loras"] == {}
    assert client.post("/v1/videos", json={"prompt": "a cat", "loras": {}}).status_code == 200  # = absent
    store.close()


def test_good_loras_are_queued_as_given_json_and_form(service):
    client = TestClient(create_app(service))
    info = client.get("/v1/server").json()
    assert info["loras"] == STARTUP and info["limits"]["max_lora_scale"] == MAX_LORA_SCALE
    job = client.post("/v1/videos", json={"prompt": "a cat", "loras": {"detail": 0, "style": -10}}).json()
    assert job["request"]["features"] == {"loras": {"detail": 0.0, "style": -10.0}}
    form = client.post("/v1/videos", data={"prompt": "a cat", "loras": '{"style": 0.25}'}).json()
    assert form["request"]["features"] == {"loras": {"style": 0.25}}
    bad_form = client.post("/v1/videos", data={"prompt": "a cat", "loras": "style=0.25"})
    assert bad_form.status_code == 400
    assert "loras must be a JSON object" in bad_form.json()["error"]["message"]
    plain = client.post("/v1/videos", json={"prompt": "a cat"}).json()
    assert plain["request"]["features"] == {}  # absent: the start-up scales, decided when the job runs
    assert len(service.store.list()) == 3


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------


def _lora_numbers(page) -> list:
    import gradio as gr

    return [b for b in page.blocks.values()
            if isinstance(b, gr.Number) and (b.elem_id or "").startswith("lora_")]


def test_page_has_one_number_per_lora_and_sends_them(service, tmp_path):
    from hyvideo.server.page import _generate_handler, build_page, form_to_request

    numbers = _lora_numbers(build_page(service))
    assert [(n.label, n.value) for n in numbers] == list(STARTUP.items())  # load order, start-up scales
    store = JobStore(tmp_path / "none.sqlite3")
    assert _lora_numbers(build_page(Service(store=store, defaults=DEFAULTS, limits=ServerLimits(),
                                            save_dir=tmp_path))) == []
    store.close()
    form = ("a cat", "", 64, 48, 5, 2, "7", 6.0, 1.0, 7.0, 1, "none")
    assert "loras" not in form_to_request(*form)
    # The Generate handler: the form's fields, then the numbers; an emptied number keeps its start-up scale.
    first = next(_generate_handler(service, list(STARTUP))(*form, 0.0, None))
    (job,) = service.store.list()
    assert first[0] == job.id and job.request["features"]["loras"] == {"style": 0.0}


def test_page_out_of_range_number_is_a_gradio_error(service):
    import gradio as gr

    from hyvideo.server.page import _generate_handler

    form = ("a cat", "", 64, 48, 5, 2, "7", 6.0, 1.0, 7.0, 1, "none")
    with pytest.raises(gr.Error, match="the scale of detail must be between -10 and 10"):
        next(_generate_handler(service, list(STARTUP))(*form, 0.0, 11.0))
    assert service.store.list() == []


# --------------------------------------------------------------------------------------------------
# Live servers: a real browser; torchrun with two ranks
# --------------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_browser_page_sets_a_lora_scale_per_job(browser, tiny_tree, lora_files, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    save = tmp_path / "out"
    server = LiveServer(tiny_tree, save, extra=tuple(lora_flags(lora_files))).wait_ready()
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(server.url + "/")
        style = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#lora_0 input")))
        labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#loras [data-testid='block-info']")]
        assert labels == list(STARTUP), labels
        assert float(style.get_attribute("value")) == STARTUP["style"]
        _set(style, "0")
        for field, value in (("width", "64"), ("height", "48"), ("frames", "5")):
            _set(driver.find_element(By.CSS_SELECTOR, f"#{field} input"), value)
        _set(driver.find_element(By.CSS_SELECTOR, "#steps input[type=number]"), "2")
        driver.find_element(By.ID, "generate").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#result video[src]")))
        (job,) = server.client.get("/v1/videos").json()["data"]
        assert job["request"]["features"]["loras"] == {"style": 0.0, "detail": -0.5}
        sidecar = json.loads((save / job["files"][0]).with_suffix(".json").read_text())
        assert [(r["name"], r["scale"]) for r in sidecar["loras"]] == [("style", 0.0), ("detail", -0.5)]
    finally:
        server.stop()


@pytest.mark.multigpu
def test_torchrun_ranks_apply_each_jobs_scales(tiny_tree, lora_files, tmp_path):
    """Ulysses 2: a rank that kept the previous scales would change the video, not just the sidecar."""
    from hyvideo.inference import HunyuanVideoSampler, prepare_loras

    save = tmp_path / "out"
    flags = ("--ulysses-degree", "2", "--save-latents", *lora_flags(lora_files))
    server = LiveServer(tiny_tree, save, nproc=2, extra=flags).wait_ready()
    try:
        assert server.client.get("/v1/server").json()["loras"] == STARTUP
        results = []
        for extra in ({"loras": {"style": 0}}, {}):
            created = server.client.post("/v1/videos", json={"prompt": "a red ball", "seed": 3, **SMALL_JOB,
                                                             **extra}).json()
            job = server.wait_job(created["id"])
            assert job["status"] == "completed", server.tail()
            sidecar = json.loads((save / job["files"][0]).with_suffix(".json").read_text())
            results.append((load_latents(save / sidecar["latents_file"])[0], sidecar))
    finally:
        server.stop()
    configs, _ = parse_server_args(["--model-base", str(tiny_tree), *FP32, *lora_flags(lora_files),
                                    "--video-size", "48", "64", "--video-length", "5", "--infer-steps", "2"])
    sampler = HunyuanVideoSampler.from_pretrained(configs)  # one process: the reference
    loras = prepare_loras(configs.model)
    sampler.add_lora(loras[1][0], STARTUP["detail"])
    only_detail = predict_latents(sampler, configs, seed=3)
    sampler.unload_loras()
    for weights, scale in loras:
        sampler.add_lora(weights, scale)
    both = predict_latents(sampler, configs, seed=3)
    assert rel_err(only_detail, both) > 1e-2  # the LoRA matters far more than the tolerance below
    assert rel_err(results[0][0], only_detail) <= 1e-5
    assert rel_err(results[1][0], both) <= 1e-5
    assert [(r["name"], r["scale"]) for r in results[0][1]["loras"]] == [("style", 0.0), ("detail", -0.5)]
    assert results[0][1]["settings"]["runtime"]["world_size"] == 2
