"""The launch environment: what torchrun tells each process (RANK, WORLD_SIZE, LOCAL_RANK, ...)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells each process through the environment; one process without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def under_launcher(self) -> bool:
        return self.world_size > 1

    @property
    def reports_errors(self) -> bool:
        """Whether this process prints errors that every process detects identically: one per node."""
        return self.local_rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from exc


def launch_env() -> LaunchEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (each process of a launch gets its own)."""
    world_size = _env_int("WORLD_SIZE", 1)
    return LaunchEnv(
        rank=_env_int("RANK", 0), world_size=world_size, local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", world_size),
    )
