"""Flow-matching scheduler used by the HunyuanVideo sampler."""

from .scheduling_flow_match_discrete import (
    FlowMatchDiscreteScheduler,
    euler_step,
    flow_sigmas,
    shift_sigmas,
    timesteps_from_sigmas,
)

__all__ = [
    "FlowMatchDiscreteScheduler",
    "euler_step",
    "flow_sigmas",
    "shift_sigmas",
    "timesteps_from_sigmas",
]
