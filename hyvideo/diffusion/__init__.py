"""Diffusion components: the flow-matching scheduler and (lazily) the sampling pipeline.

The pipeline is resolved on first access so that importing the scheduler stays light.
"""

from __future__ import annotations

from typing import Any

from .schedulers import FlowMatchDiscreteScheduler

__all__ = ["FlowMatchDiscreteScheduler", "HunyuanVideoPipeline"]


def __getattr__(name: str) -> Any:
    if name == "HunyuanVideoPipeline":
        from .pipelines import HunyuanVideoPipeline

        return HunyuanVideoPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
