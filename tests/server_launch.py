"""Start gradio_server.py as a real process on 127.0.0.1 (tiny tree) and talk to it, for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180  # model loading and the Gradio import on a busy 2-core machine
# Small jobs on the tiny tree: a second or two each.
SMALL_JOB = {"size": "64x48", "frames": 5, "steps": 2}
FP32 = ["--precision", "fp32", "--vae-precision", "fp32", "--text-encoder-precision", "fp32",
        "--text-encoder-precision-2", "fp32"]


def wait_done(store, job_id: str, timeout_s: float = 300):
    """Poll a JobStore (in-process server tests) until the job completed or failed; its final record."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job.status in ("completed", "failed"):
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {job.status}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    """A gradio_server.py process (or a torchrun launch of it); `url`, `client`, `stop()`, `kill()`."""

    def __init__(self, tiny: Path, save: Path, *, port: int | None = None, nproc: int = 1,
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None, log: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or save.parent / f"server-{self.port}.log"
        run_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                       GRADIO_ANALYTICS_ENABLED="False")
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MODEL_BASE", "SERVER_NAME", "SERVER_PORT",
                     "HYVIDEO_SERVER_TOKEN"):
            run_env.pop(name, None)
        run_env.update(env or {})
        args = ["--model-base", str(tiny), "--save-path", str(save), "--server-port", str(self.port), *FP32,
                *extra]
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen([*launcher, str(REPO / "gradio_server.py"), *args], cwd=REPO,
                                     env=run_env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        headers = {"Authorization": f"Bearer {run_env['HYVIDEO_SERVER_TOKEN']}"} \
            if "HYVIDEO_SERVER_TOKEN" in run_env else {}
        self.client = httpx.Client(base_url=self.url, timeout=30, headers=headers)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> LiveServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.client.get("/v1/server").status_code in (200, 401):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def wait_job(self, job_id: str, statuses=("completed", "failed"), timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/videos/{job_id}").json()
            if job["status"] in statuses:
                return job
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not {statuses} after {timeout_s} s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM to the whole process group (torchrun and its ranks), then SIGKILL if it lingers."""
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close()

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        self.proc.wait(30)
        self._close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _close(self) -> None:
        self.client.close()
        self._log_file.close()
