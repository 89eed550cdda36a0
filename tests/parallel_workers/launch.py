"""Launch a script under torchrun with N CPU processes (gloo), for the multigpu tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 300


def torchrun(
    nproc: int,
    script: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout_s: float = LAUNCH_TIMEOUT_S,
) -> tuple[subprocess.CompletedProcess, float]:
    """Run `script args` under `torchrun --standalone --nproc_per_node=nproc`; return (process, seconds)."""
    run_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MODEL_BASE"):  # never inherit a launch environment
        run_env.pop(name, None)
    run_env.update(env or {})
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
