"""The /v1/videos API and its job queue.

In process (no models): every kind of bad request gets a 4xx JSON error and queues nothing; limits, auth,
unknown ids, the store's restart rule. Against a live gradio_server.py on the tiny tree: create -> poll ->
content, two jobs run in submission order, cancel leaves no file, and a SIGKILL with one job running and one
queued loses nothing (the running one is failed/interrupted, the queued one completes after the restart).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hyvideo.config import SamplingConfig, ServerLimits
from hyvideo.server.api import create_app
from hyvideo.server.schema import JobRequest, RequestError, parse_request
from hyvideo.server.service import Service
from hyvideo.server.store import DB_NAME, JobStore
from hyvideo.testing.tiny import write_tiny_checkpoints
from tests.server_launch import SMALL_JOB, LiveServer

DEFAULTS = SamplingConfig(prompts=(), neg_prompt=None, height=128, width=128, video_length=17, infer_steps=10,
                          seed=None, cfg_scale=1.0, embedded_cfg_scale=6.0, flow_shift=7.0, flow_reverse=True,
                          flow_solver="euler", denoise_type="flow", num_videos=1, batch_size=1)
LIMITS = ServerLimits(max_queue=3)


@pytest.fixture
def service(tmp_path) -> Service:
    store = JobStore(tmp_path / DB_NAME)
    yield Service(store=store, defaults=DEFAULTS, limits=LIMITS, save_dir=tmp_path)
    store.close()


@pytest.fixture
def client(service) -> TestClient:
    return TestClient(create_app(service))


BAD_REQUESTS = [
    ({"prompt": "a cat", "steps": -3}, "steps must be between 1 and 100"),
    ({"prompt": "a cat", "frames": 10**6}, "frames must be between 1 and 129"),
    ({"prompt": "a cat", "frames": 6}, "frames must be 1 or 4k+1"),
    ({"prompt": "a cat", "seconds": 60}, "the limit is 129"),
    ({"prompt": "a cat", "seconds": 2, "frames": 49}, "seconds or frames, not both"),
    ({"prompt": "a cat", "steps": "20"}, "steps must be an integer, got a string"),
    ({"prompt": "a cat", "steps": 2.5}, "steps must be an integer, got a number"),
    ({"prompt": "a cat", "seed": True}, "seed must be an integer, got a boolean"),
    ({"prompt": "a cat", "guidance_scale": "high"}, "guidance_scale must be a number"),
    ({"prompt": "a cat", "flow_shift": 0}, "flow_shift must be in (0, 20]"),
    ({"prompt": "a cat", "size": 720}, "size must be a string 'WIDTHxHEIGHT'"),
    ({"prompt": "a cat", "size": "../../etc/passwd"}, "size must be a string"),
    ({"prompt": "a cat", "size": "100x64"}, "width 100 is not a multiple of 16"),
    ({"prompt": "a cat", "size": "1920x1088"}, "width 1920 is outside 16..1280"),
    ({"prompt": "a cat", "n": 5}, "n must be between 1 and 4"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": ["a", "b"]}, "prompt must be a string, got a list"),
    ({"prompt": "x" * 2001}, "the limit is 2000"),
    ({"prompt": "a cat", "save_path": "/tmp"}, "unknown field(s) save_path"),
    ({"prompt": "a cat", "model": "sora-2"}, "model must be 'hunyuanvideo-t2v-720p'"),
    (["a cat"], "must be a JSON object, got a list"),
    ({"prompt": "a cat", "cache": "fastest"}, "cache must be one of none, magcache, teacache, fbcache"),
    ({"prompt": "a cat", "cache": "magcache", "cache_threshold": -1},
     "cache_threshold must be a number >= 0"),
    ({"prompt": "a cat", "cache": "teacache", "cache_threshold": "0.1"}, "cache_threshold must be a number"),
    ({"prompt": "a cat", "cache_threshold": 0.1}, "cache_threshold needs a step cache in the same request"),
]


@pytest.mark.parametrize(("body", "message"), BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_request_gets_400_json_and_queues_nothing(client, service, body, message):
    answer = client.post("/v1/videos", json=body)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]
    assert service.store.list() == []


@pytest.mark.parametrize("field", ["size", "seconds", "steps", "model", "cache"])
def test_a_huge_bad_value_is_echoed_short(client, field):
    """A 60 kB string in any field still gets a short one-line error, not the whole value back."""
    answer = client.post("/v1/videos", json={"prompt": "a cat", field: "9" * 60_000 + "x"})
    message = answer.json()["error"]["message"]
    assert answer.status_code == 400 and field in message
    assert len(message) < 300 and "\n" not in message


def test_step_cache_per_job_maps_onto_the_sampler_and_the_sidecar():
    from hyvideo.config import parse_args
    from hyvideo.server.worker import feature_kwargs, job_cache

    server = parse_args(["--cache", "magcache", "--cache-threshold", "0.3"])
    plain = parse_request({"prompt": "a cat"}, DEFAULTS, LIMITS)
    assert plain.features == {} and feature_kwargs(plain.features, server)["cache"] == server.cache
    tea = parse_request({"prompt": "a cat", "cache": "teacache"}, DEFAULTS, LIMITS)
    cache = feature_kwargs(tea.features, server)["cache"]
    assert (cache.policy, cache.effective_threshold) == ("teacache", 0.15)  # teacache's own default
    same = parse_request({"prompt": "a cat", "cache": "magcache"}, DEFAULTS, LIMITS)
    assert job_cache(server.cache, same.features) == server.cache  # the server's threshold stays
    tuned = parse_request({"prompt": "a cat", "cache": "fbcache", "cache_threshold": 0}, DEFAULTS, LIMITS)
    assert job_cache(server.cache, tuned.features).threshold == 0.0
    none = parse_request({"prompt": "a cat", "cache": "none"}, DEFAULTS, LIMITS)
    off = job_cache(server.cache, none.features)
    assert off.policy == "none" and not off.enabled
    # A job survives the store's JSON round trip with its features.
    assert JobRequest.from_dict(json.loads(json.dumps(tuned.to_dict()))).features == tuned.features


def test_malformed_bodies_and_parameters_get_4xx_not_500(client, service):
    assert client.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"}
                       ).status_code == 400
    assert client.post("/v1/videos", content=b"x" * 70_000).status_code == 413
    assert client.get("/v1/videos?limit=abc").status_code == 400
    assert client.get("/v1/videos?limit=0").status_code == 400
    assert client.get("/v1/videos?order=sideways").status_code == 400
    for bad_id in ("video_nope", "..%2F..%2Fjobs.sqlite3", "video_" + "0" * 24):
        answer = client.get(f"/v1/videos/{bad_id}/content")
        assert answer.status_code == 404 and "error" in answer.json()
    assert service.store.list() == []


def test_form_fields_as_openai_sdk_sends_them(client):
    form = {"prompt": "a cat", "seconds": "2", "size": "64x48", "steps": "3"}
    answer = client.post("/v1/videos", data=form)
    assert answer.status_code == 200, answer.text
    job = answer.json()
    assert (job["frames"], job["size"], job["total_steps"], job["status"]) == (49, "64x48", 3, "queued")


def test_queue_limit_and_queue_positions(client, service):
    ids = [client.post("/v1/videos", json={"prompt": f"p{i}"}).json()["id"] for i in range(LIMITS.max_queue)]
    full = client.post("/v1/videos", json={"prompt": "one too many"})
    assert full.status_code == 429 and "queue is full" in full.json()["error"]["message"]
    assert [client.get(f"/v1/videos/{i}").json()["queue_position"] for i in ids] == [1, 2, 3]
    assert client.get(f"/v1/videos/{ids[0]}/content").status_code == 409  # not ready yet
    # Cancelling a queued job fails it at once and frees its place.
    cancelled = client.post(f"/v1/videos/{ids[0]}/cancel").json()
    assert cancelled["status"] == "failed" and cancelled["error"]["code"] == "cancelled"
    assert client.get(f"/v1/videos/{ids[1]}").json()["queue_position"] == 1
    assert client.post("/v1/videos", json={"prompt": "now it fits"}).status_code == 200
    listed = client.get("/v1/videos?limit=2").json()
    assert listed["has_more"] and listed["data"][0]["prompt"] == "now it fits"  # newest first
    rest = client.get(f"/v1/videos?limit=10&after={listed['last_id']}").json()["data"]
    assert [j["prompt"] for j in rest] == ["p1", "p0"]
    assert client.delete(f"/v1/videos/{ids[2]}").json() == {"id": ids[2], "object": "video.deleted",
                                                            "deleted": True}
    assert client.get(f"/v1/videos/{ids[2]}").status_code == 404


def test_bearer_token(service):
    service.token = "s3cret"
    client = TestClient(create_app(service))
    assert client.get("/v1/videos").status_code == 401
    assert client.get("/v1/videos", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/videos", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_request_maps_onto_sampling_config():
    request = parse_request({"prompt": " a cat ", "size": "96x64", "seconds": "2", "steps": 7, "seed": 5,
                             "guidance_scale": 2, "negative_prompt": "blur", "n": 2, "flow_shift": 5.0},
                            DEFAULTS, LIMITS)
    sampling = request.sampling_config(DEFAULTS, seed=5)
    s = sampling
    assert (s.prompts, s.width, s.height, s.video_length) == (("a cat",), 96, 64, 49)
    assert (s.infer_steps, s.seed, s.cfg_scale, s.neg_prompt) == (7, 5, 2.0, "blur")
    assert (sampling.num_videos, sampling.flow_shift, sampling.embedded_cfg_scale) == (2, 5.0, 6.0)
    assert JobRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request  # survives the store
    with pytest.raises(RequestError):
        parse_request({"prompt": "x", "lora_scale": 1.0}, DEFAULTS, LIMITS)  # features: allow-list only


def test_store_restart_rule(tmp_path):
    store = JobStore(tmp_path / DB_NAME)
    first, second = (store.add({"prompt": p, "steps": 2}, max_queue=5) for p in ("running", "waiting"))
    assert store.claim_next().id == first.id
    store.close()
    reopened = JobStore(tmp_path / DB_NAME)  # as after a crash
    assert reopened.recover_interrupted() == [first.id]
    assert reopened.get(first.id).error_code == "interrupted"
    assert reopened.claim_next().id == second.id
    reopened.close()


# --------------------------------------------------------------------------------------------------
# A live server on the tiny tree
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


LONG_JOB = {"size": "128x128", "frames": 17, "steps": 100}  # long enough to be caught running


def _no_partial_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".partial" in p.name]


@pytest.mark.slow  # two server starts (model loading, Gradio import): ~30 s idle, more on a busy machine
def test_live_server_jobs_cancel_and_sigkill_restart(tiny_tree, tmp_path):
    """One server process for create/poll/content/order/cancel/delete, SIGKILLed mid-job, then restarted."""
    save = tmp_path / "out"
    server = LiveServer(tiny_tree, save).wait_ready()
    try:
        api = server.client
        # 1. Two jobs queued at once complete one at a time, in order.
        first = api.post("/v1/videos", json={"prompt": "first", "seed": 11, **SMALL_JOB}).json()
        second = api.post("/v1/videos", json={"prompt": "second", **SMALL_JOB}).json()
        done = [server.wait_job(j["id"]) for j in (first, second)]
        assert [j["status"] for j in done] == ["completed", "completed"], done
        assert done[0]["completed_at"] <= done[1]["started_at"]
        assert done[0]["seed"] == 11 and isinstance(done[1]["seed"], int)  # drawn and reported
        # 2. The content is the mp4 on disk; its sidecar records the job.
        content = api.get(f"/v1/videos/{first['id']}/content")
        assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
        assert content.content[4:8] == b"ftyp"
        mp4 = save / done[0]["files"][0]
        assert mp4.read_bytes() == content.content
        sidecar = json.loads(mp4.with_suffix(".json").read_text())
        assert (sidecar["seed"], sidecar["job_id"], sidecar["prompt"]) == (11, first["id"], "first")
        assert sidecar["settings"]["sampling"]["infer_steps"] == SMALL_JOB["steps"]
        # 2b. The page's /generate endpoint through gradio_client (README example), same queue.
        from gradio_client import Client

        client = Client(server.url + "/", verbose=False)
        job_id, status, video, seed, sidecar_file, _ = client.predict(
            "from gradio_client", "", 64, 48, 5, 2, "42", 6.0, 1.0, 7.0, 1, api_name="/generate")
        assert status.startswith("Done") and seed == "42" and video, status
        assert api.get(f"/v1/videos/{job_id}").json()["seed"] == 42
        assert json.loads(Path(sidecar_file).read_text())["seed"] == 42
        assert api.delete(f"/v1/videos/{job_id}").json()["deleted"]
        # 3. Cancel a long job while it runs: it stops between steps and writes nothing.
        long = api.post("/v1/videos", json={"prompt": "long", **LONG_JOB}).json()
        server.wait_job(long["id"], statuses=("in_progress",))
        assert api.post(f"/v1/videos/{long['id']}/cancel").json()["cancel_requested"]
        stopped = server.wait_job(long["id"])
        assert stopped["status"] == "failed" and stopped["error"]["code"] == "cancelled", stopped
        assert len(list(save.glob("*.mp4"))) == 2 and _no_partial_files(save)
        # 4. Delete removes the files too.
        assert api.delete(f"/v1/videos/{second['id']}").json()["deleted"]
        assert not (save / done[1]["files"][0]).exists()
        # 5. One job running, one queued, then SIGKILL: no clean-up of any kind.
        running = api.post("/v1/videos", json={"prompt": "running", **LONG_JOB}).json()
        queued = api.post("/v1/videos", json={"prompt": "queued", **SMALL_JOB}).json()
        server.wait_job(running["id"], statuses=("in_progress",))
    finally:
        server.kill()
    restarted = LiveServer(tiny_tree, save).wait_ready()  # a new port, the same output folder and queue
    try:
        finished = restarted.wait_job(queued["id"])
        assert finished["status"] == "completed", finished
        interrupted = restarted.client.get(f"/v1/videos/{running['id']}").json()
        assert interrupted["status"] == "failed" and interrupted["error"]["code"] == "interrupted"
        listed = restarted.client.get("/v1/videos?order=asc").json()["data"]
        assert [j["id"] for j in listed] == [first["id"], long["id"], running["id"], queued["id"]]
        assert restarted.client.get(f"/v1/videos/{first['id']}/content").status_code == 200
        assert len(list(save.glob("*.mp4"))) == 2 and _no_partial_files(save)
    finally:
        restarted.stop()
