"""Launch a script under torchrun with N CPU processes (gloo), for the multigpu tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 300


def _launch_env(env: dict[str, str] | None) -> dict[str, str]:
    run_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MODEL_BASE"):  # never inherited
        run_env.pop(name, None)
    run_env.update(env or {})
    return run_env


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_nodes(
    nnodes: int, nproc_per_node: int, script: Path, *args: str, timeout_s: float = LAUNCH_TIMEOUT_S
) -> tuple[list[subprocess.CompletedProcess], float]:
    """Run `nnodes` torchrun launchers on this machine that meet through a c10d rendezvous on a free port,
    as separate nodes would (each launcher starts `nproc_per_node` processes); return their results."""
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
           "--rdzv-id=hyvideo-test", str(script), *args]
    start = time.monotonic()
    launchers = [subprocess.Popen(cmd, cwd=REPO, env=_launch_env(None), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(nnodes)]
    results = []
    try:
        for launcher in launchers:
            out, err = launcher.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
            results.append(subprocess.CompletedProcess(cmd, launcher.returncode, out, err))
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
                launcher.communicate()
    return results, time.monotonic() - start


def torchrun(
    nproc: int,
    script: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout_s: float = LAUNCH_TIMEOUT_S,
) -> tuple[subprocess.CompletedProcess, float]:
    """Run `script args` under `torchrun --standalone --nproc_per_node=nproc`; return (process, seconds)."""
    run_env = _launch_env(env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    start = time.monotonic()
    proc = subprocess.run(
        [*cmd, str(script), *args], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout_s
    )
    return proc, time.monotonic() - start


def tail(proc: subprocess.CompletedProcess, chars: int = 6000) -> str:
    """The end of a finished launch's output, for failure messages."""
    out, err = proc.stdout[-chars:], proc.stderr[-chars:]
    return f"rc={proc.returncode}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
