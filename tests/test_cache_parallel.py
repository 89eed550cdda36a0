"""Step caches under torchrun (2 CPU processes, gloo; Ulysses 2 and ring 2): every rank takes the same
decisions, the computed steps equal the single-process ones and the latents match (fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import rel_err
from tests.parallel_workers import cache_worker as worker_cases
from tests.parallel_workers import sp_cases as cases
from tests.parallel_workers.launch import REPO, tail, torchrun

WORKER = REPO / "tests" / "parallel_workers" / "cache_worker.py"
LAYOUTS = ("2x1", "1x2")
TOL = 1e-5  # as tests/test_parallel_dit_pipeline.py: the split attention sums in another order


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache_sp") / "results.pt"
    proc, _ = torchrun(2, WORKER, str(out), *LAYOUTS)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"worker failed:\n{tail(proc)}")
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def reference():
    dit = cases.build_dit()
    pipe = cases.build_pipeline(dit, None)
    with torch.no_grad():
        return {name: worker_cases.run_case(pipe, cache, seed=cases.PIPE_SEED)
                for name, cache in worker_cases.CACHE_CASES.items()}


@pytest.mark.multigpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(worker_cases.CACHE_CASES))
def test_parallel_decisions_and_latents_match_single_process(launched, reference, layout, name):
    result = launched[f"{layout}/{name}"]
    latents, record = reference[name]
    assert result["ranks_equal"], "ranks took different decisions or returned different latents"
    assert result["record"]["computed_steps"] == record["computed_steps"]
    if name != "calibrate":  # each policy really reused steps here
        assert len(record["computed_steps"]) < worker_cases.STEPS
    else:
        measured = result["record"]["measured_mag_ratios"]
        assert measured == pytest.approx(record["measured_mag_ratios"], rel=1e-5)
    assert rel_err(result["latents"], latents) <= TOL
