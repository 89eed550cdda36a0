"""Flow-matching sampler schedule: shifted sigmas and the Euler update.

Model convention (HunyuanVideo): x_σ = σ·noise + (1 − σ)·x₀, and the network predicts the velocity
v = dx/dσ (≈ noise − x₀). Sampling walks σ from 1 down to 0 with explicit Euler steps.

The math lives in small pure functions (`shift_sigmas`, `flow_sigmas`, `timesteps_from_sigmas`,
`euler_step`); `FlowMatchDiscreteScheduler` keeps the upstream class surface (`set_timesteps`, `step`,
`timesteps`, `sigmas`) on top of them so the pipeline reads like the original.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

SOLVERS = ("euler",)


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift σ' = shift·s / (1 + (shift − 1)·s); shift > 1 spends more steps near σ = 1."""
    return shift * s / (1 + (shift - 1) * s)


def flow_sigmas(num_steps: int, shift: float, *, reverse: bool = True) -> torch.Tensor:
    """The N+1 shifted sigmas (float32, CPU) for `num_steps` Euler steps, from 1 down to 0.

    Args:
        num_steps: number of denoising steps N (≥ 1).
        shift: time shift (> 0); 1 gives the plain linear schedule.
        reverse: True walks σ from 1 to 0 (the real default: every official script passes
            --flow-reverse). False returns 1 − σ, which is what the original does without that flag.

    Returns:
        (N+1,) float32 tensor.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (the default is 7.0), got {shift!r}.")
    # Parity: torch fp32 linspace, shifted in fp32, exactly like the original's set_timesteps.
    s = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    sigmas = shift_sigmas(s, shift)
    if not reverse:
        # Parity: upstream's behaviour without --flow-reverse (runs the schedule backwards).
        sigmas = 1 - sigmas
    return sigmas


def timesteps_from_sigmas(sigmas: torch.Tensor, *, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Model timesteps σ[:-1]·1000 (float32): the terminal sigma has no model call."""
    return (sigmas[:-1] * num_train_timesteps).to(torch.float32)


def euler_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    *,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
) -> torch.Tensor:
    """One explicit Euler step x + v·(σ_next − σ), computed in float32.

    Args:
        sample: x at `sigma`, any shape and floating dtype.
        velocity: model output v = dx/dσ, same shape as `sample`.
        sigma, sigma_next: current and next noise level (keyword-only so they cannot be swapped).

    Returns:
        float32 tensor shaped like `sample`.
    """
    # The step is formed as a float32 difference, like the original's 0-dim sigma tensors.
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    return sample.to(torch.float32) + velocity.to(torch.float32) * dt


# --------------------------------------------------------------------------------------------------
# Scheduler class (upstream surface)
# --------------------------------------------------------------------------------------------------


class FlowMatchDiscreteScheduler:
    """Discrete flow-matching schedule with an Euler solver (one model call per step)."""

    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        reverse: bool = True,
        solver: str = "euler",
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"Unknown flow solver {solver!r}; the only supported solver is 'euler'.")
        if not shift > 0:
            raise ValueError(f"shift must be > 0 (the default is 7.0), got {shift!r}.")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
            raise ValueError(f"num_train_timesteps must be an integer, got {num_train_timesteps!r}.")
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)
        self.reverse = bool(reverse)
        self.solver = solver
        self.num_inference_steps: int | None = None
        self.sigmas: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self._step_index: int | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_train_timesteps={self.num_train_timesteps}, shift={self.shift}, "
            f"reverse={self.reverse}, solver={self.solver!r})"
        )

    @property
    def step_index(self) -> int | None:
        """Index of the next step to take; None until the first `step` call after `set_timesteps`."""
        return self._step_index

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Build the schedule: `sigmas` (N+1, float32, CPU) and `timesteps` (N, float32, on `device`)."""
        sigmas = flow_sigmas(num_inference_steps, self.shift, reverse=self.reverse)
        self.num_inference_steps = num_inference_steps
        self.sigmas = sigmas
        self.timesteps = timesteps_from_sigmas(sigmas, num_train_timesteps=self.num_train_timesteps).to(
            device
        )
        self._step_index = None

    def scale_model_input(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """Identity: flow matching feeds the latents to the model unscaled."""
        return sample

    def index_for_timestep(self, timestep: torch.Tensor | float) -> int:
        """Position of `timestep` in `timesteps`; the second match if it occurs twice (upstream rule)."""
        timesteps = self._require_timesteps()
        value = torch.as_tensor(timestep, dtype=torch.float32, device=timesteps.device)
        if value.numel() != 1:
            raise ValueError(
                f"step() expects one scalar timestep (got shape {tuple(value.shape)}); pass the loop's t, "
                "not the batch-expanded copy."
            )
        indices = (timesteps == value.reshape(())).nonzero().flatten()
        if indices.numel() == 0:
            raise ValueError(
                f"Timestep {float(value)} is not in this scheduler's timesteps; iterate over "
                "scheduler.timesteps after set_timesteps()."
            )
        # Parity: upstream takes the second occurrence when a timestep is duplicated.
        return int(indices[1] if indices.numel() > 1 else indices[0])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
    ) -> torch.Tensor:
        """Advance `sample` by one Euler step.

        Args:
            model_output: predicted velocity v, shaped like `sample` (any floating dtype).
            timestep: the current entry of `self.timesteps` (float tensor or float; integers are rejected
                because they are almost always a caller bug with this continuous schedule).
            sample: latents x at the current sigma, e.g. (B, C, T', H/8, W/8).

        Returns:
            The latents at the next sigma, float32 (a tensor, not a tuple: do not index it with [0]).
        """
        if _is_integer_timestep(timestep):
            raise ValueError(
                "Passing integer indices (e.g. from enumerate(timesteps)) as timesteps to step() is not "
                "supported; pass one of scheduler.timesteps instead."
            )
        self._require_timesteps()
        sigmas = self.sigmas
        if self._step_index is None:
            # Parity: like upstream, the index is found by matching the first timestep, then counted.
            self._step_index = self.index_for_timestep(timestep)
        i = self._step_index
        if i + 1 >= len(sigmas):
            raise ValueError(
                f"All {len(sigmas) - 1} steps have already been taken; call set_timesteps() to start again."
            )
        prev_sample = euler_step(sample, model_output, sigma=sigmas[i], sigma_next=sigmas[i + 1])
        self._step_index = i + 1
        return prev_sample

    def _require_timesteps(self) -> torch.Tensor:
        if self.timesteps is None:
            raise ValueError("set_timesteps(num_inference_steps) must be called before stepping.")
        return self.timesteps


def _is_integer_timestep(timestep: object) -> bool:
    if isinstance(timestep, torch.Tensor):
        return not timestep.is_floating_point()
    return isinstance(timestep, int)  # bool is an int too
