"""Flow-matching scheduler: shifted sigmas, timesteps, the Euler update and parity with diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from hyvideo.diffusion import FlowMatchDiscreteScheduler
from hyvideo.diffusion.schedulers import euler_step, flow_sigmas, shift_sigmas, timesteps_from_sigmas
from tests.helpers import rel_err

# Appendix A of the spec (shift 7, 50 steps, reverse).
SIGMAS_HEAD = [1.0, 0.997093, 0.99408287, 0.9909639, 0.9877301]
SIGMAS_TAIL = [0.37837836, 0.30882353, 0.22580644, 0.125, 0.0]


def _diffusers_schedule(num_steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmas and timesteps exactly as diffusers' HunyuanVideoPipeline sets them up."""
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1], device="cpu")
    return ref.sigmas, ref.timesteps


def test_appendix_a_vectors():
    sigmas = flow_sigmas(50, 7.0)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (51,)
    torch.testing.assert_close(sigmas[:5], torch.tensor(SIGMAS_HEAD), rtol=2e-7, atol=1e-7)
    torch.testing.assert_close(sigmas[46:], torch.tensor(SIGMAS_TAIL), rtol=2e-7, atol=1e-7)


def test_timesteps_are_sigmas_times_1000():
    sched = FlowMatchDiscreteScheduler(shift=7.0)
    sched.set_timesteps(50, device="cpu")
    assert sched.timesteps.dtype == torch.float32 and sched.timesteps.shape == (50,)
    assert sched.sigmas.shape == (51,)
    expected = torch.tensor([1000.0, 997.093, 994.083, 990.964, 987.730])
    torch.testing.assert_close(sched.timesteps[:5], expected, rtol=0, atol=1e-3)
    tail = torch.tensor([308.824, 225.806, 125.0])
    torch.testing.assert_close(sched.timesteps[-3:], tail, rtol=0, atol=1e-3)
    assert torch.equal(timesteps_from_sigmas(sched.sigmas), sched.sigmas[:-1] * 1000)


def test_shift_formula_and_identity_at_shift_one():
    s = torch.rand(100, dtype=torch.float64)
    expected = 7.0 * s / (1.0 + 6.0 * s)
    assert rel_err(shift_sigmas(s, 7.0), expected) < 1e-15
    assert torch.equal(shift_sigmas(s, 1.0), s)
    lin = flow_sigmas(10, 1.0)
    assert torch.equal(lin, torch.linspace(1, 0, 11))


@pytest.mark.parametrize(("num_steps", "shift"), [(50, 7.0), (30, 17.0), (4, 1.0)])
def test_matches_diffusers_hunyuan_setup(num_steps, shift):
    ref_sigmas, ref_timesteps = _diffusers_schedule(num_steps, shift)
    sched = FlowMatchDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps, device="cpu")
    assert sched.sigmas.shape == ref_sigmas.shape
    assert rel_err(sched.sigmas, ref_sigmas) <= 1e-6
    assert rel_err(sched.timesteps, ref_timesteps) <= 1e-6


def test_full_loop_matches_diffusers_euler():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 3, 5, generator=gen)
    velocities = [torch.randn(2, 4, 3, 5, generator=gen) for _ in range(8)]

    ref = FlowMatchEulerDiscreteScheduler(shift=7.0)
    ref.set_timesteps(sigmas=np.linspace(1.0, 0.0, 9)[:-1], device="cpu")
    ours = FlowMatchDiscreteScheduler(shift=7.0)
    ours.set_timesteps(8)

    x_ref, x_ours = x0.clone(), x0.clone()
    for i, v in enumerate(velocities):
        x_ref = ref.step(v, ref.timesteps[i], x_ref, return_dict=False)[0]
        x_ours = ours.step(v, ours.timesteps[i], x_ours)
    assert rel_err(x_ours, x_ref) <= 1e-6


def test_euler_formula_on_random_tensors():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=gen)
    v = torch.randn(2, 3, 4, 5, generator=gen)
    out = euler_step(x, v, sigma=0.75, sigma_next=0.5)
    expected = x.double() + v.double() * (0.5 - 0.75)
    assert rel_err(out, expected) < 1e-6
    # Swapping sigma and sigma_next must change the result (the direction matters).
    assert not torch.allclose(euler_step(x, v, sigma=0.5, sigma_next=0.75), out)


def test_step_walks_the_schedule_and_outputs_fp32():
    sched = FlowMatchDiscreteScheduler(shift=7.0)
    sched.set_timesteps(5)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 3, 4, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, 2, 3, 4, generator=gen).to(torch.bfloat16)
    for i, t in enumerate(sched.timesteps):
        expected = x.float() + v.float() * (sched.sigmas[i + 1] - sched.sigmas[i])
        x_next = sched.step(v, t, x)
        assert x_next.dtype == torch.float32
        assert torch.equal(x_next, expected)
        assert sched.step_index == i + 1
        x = x_next
    with pytest.raises(ValueError, match="already been taken"):
        sched.step(v, sched.timesteps[-1], x)


def test_first_step_index_found_by_matching_timestep():
    sched = FlowMatchDiscreteScheduler(shift=7.0)
    sched.set_timesteps(10)
    x, v = torch.zeros(3), torch.ones(3)
    out = sched.step(v, sched.timesteps[3], x)
    assert sched.step_index == 4
    torch.testing.assert_close(out, torch.full((3,), float(sched.sigmas[4] - sched.sigmas[3])))
    # A plain Python float works too; set_timesteps resets the index.
    sched.set_timesteps(10)
    sched.step(v, float(sched.timesteps[2]), x)
    assert sched.step_index == 3


def test_bad_inputs_raise_clear_errors():
    sched = FlowMatchDiscreteScheduler(shift=7.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.ones(2), torch.tensor(1000.0), torch.zeros(2))
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="integer"):
        sched.step(torch.ones(2), 1, torch.zeros(2))
    with pytest.raises(ValueError, match="integer"):
        sched.step(torch.ones(2), torch.tensor(1000), torch.zeros(2))
    with pytest.raises(ValueError, match="not in this scheduler"):
        sched.step(torch.ones(2), torch.tensor(123.0), torch.zeros(2))
    with pytest.raises(ValueError, match="scalar"):
        sched.step(torch.ones(2), sched.timesteps[:1].repeat(2), torch.zeros(2))
    with pytest.raises(ValueError, match="euler"):
        FlowMatchDiscreteScheduler(solver="heun")
    with pytest.raises(ValueError, match="shift"):
        FlowMatchDiscreteScheduler(shift=0.0)
    with pytest.raises(ValueError, match="positive integer"):
        sched.set_timesteps(0)


def test_reverse_false_gives_one_minus_sigma():
    forward = flow_sigmas(20, 7.0, reverse=True)
    backward = flow_sigmas(20, 7.0, reverse=False)
    assert torch.equal(backward, 1 - forward)
    sched = FlowMatchDiscreteScheduler(shift=7.0, reverse=False)
    sched.set_timesteps(20)
    assert torch.equal(sched.sigmas, backward)
    assert sched.timesteps[0] == 0.0


def test_scale_model_input_is_identity_and_order_is_one():
    sched = FlowMatchDiscreteScheduler(shift=7.0)
    x = torch.randn(2, 3)
    assert sched.scale_model_input(x, torch.tensor(1000.0)) is x
    assert FlowMatchDiscreteScheduler.order == 1
    assert not hasattr(sched, "init_noise_sigma")
