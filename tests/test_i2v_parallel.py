"""Sequence-parallel I2V (ring 3, gloo, fp32) equals one process: the first-frame range split per rank."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import rel_err
from tests.parallel_workers import i2v_cases as cases
from tests.parallel_workers.launch import REPO, tail, torchrun

pytestmark = pytest.mark.multigpu


def test_token_replace_under_sequence_parallelism_equals_one_process(tmp_path):
    out = tmp_path / "results.pt"
    proc, _ = torchrun(3, REPO / "tests" / "parallel_workers" / "i2v_worker.py", str(out))
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"worker failed:\n{tail(proc)}")
    got = torch.load(out, weights_only=True)
    # 30 image tokens, 10 per rank, frame 0 = tokens 0..14: all of rank 0's, 5 of rank 1's, none of rank 2's
    assert got["first_frame_tokens"] == [10, 5, 0]
    dit = cases.build_dit()
    with torch.no_grad():
        ref = dit(**cases.dit_inputs())
        ref_latents = cases.run_pipeline(cases.build_pipeline(dit)).latents
    # Ring attention merges partial softmaxes in another order: float32 reassociation only.
    assert rel_err(got["dit"], ref) <= 1e-5
    assert rel_err(got["pipe"], ref_latents) <= 1e-5
    assert torch.equal(got["pipe"][:, :, :1], ref_latents[:, :, :1])  # frame 0 held on every rank
