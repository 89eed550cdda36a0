"""gradio_server.py under torchrun (2 gloo CPU processes, Ulysses 2): rank 0 serves, both ranks sample.

One job end to end, a cancelled job (every rank must stop at the same step, or the next job would hang),
then another job to show the ranks are still in step.
"""

from __future__ import annotations

import json

import pytest

from hyvideo.testing.tiny import write_tiny_checkpoints
from tests.server_launch import SMALL_JOB, LiveServer


@pytest.mark.multigpu
def test_torchrun_two_ranks_serve_jobs_end_to_end(tmp_path):
    save = tmp_path / "out"
    server = LiveServer(write_tiny_checkpoints(tmp_path / "ckpts"), save, nproc=2,
                        extra=("--ulysses-degree", "2")).wait_ready()
    try:
        api = server.client
        created = api.post("/v1/videos", json={"prompt": "two ranks", **SMALL_JOB}).json()
        first = server.wait_job(created["id"])
        assert first["status"] == "completed", server.tail()
        sidecar = json.loads((save / first["files"][0]).with_suffix(".json").read_text())
        assert sidecar["settings"]["runtime"]["world_size"] == 2 and sidecar["seed"] == first["seed"]
        long = api.post("/v1/videos", json={"prompt": "long", "size": "128x128", "frames": 17, "steps": 100})
        server.wait_job(long.json()["id"], statuses=("in_progress",))
        api.post(f"/v1/videos/{long.json()['id']}/cancel")
        assert server.wait_job(long.json()["id"])["error"]["code"] == "cancelled"
        again = server.wait_job(api.post("/v1/videos", json={"prompt": "again", **SMALL_JOB}).json()["id"])
        assert again["status"] == "completed", server.tail()
        assert len(list(save.glob("*.mp4"))) == 2
        assert server.tail(100_000).count("Serving on") == 1  # only rank 0 binds the port
    finally:
        server.stop()
