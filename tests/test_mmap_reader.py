"""Checkpoints larger than RAM + swap: mapped without the swap reservation instead of read whole.

The real case (the 25.6 GB bf16 DiT on a 24 GiB host, where the kernel refuses torch.load's private mapping
with ENOMEM and the old fallback read the whole file until the OOM killer came) is measured by
`scripts/benchmark_fp8_load.py --bf16` (docs/benchmarks.md §2.7); here the refusal is simulated.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hyvideo.modules import loading
from hyvideo.modules.fp8_optimization import FP8_DTYPE
from hyvideo.modules.mmap_reader import is_mmap_refused, load_noreserve

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="MAP_NORESERVE and /proc are Linux-only")
MiB = 2**20
ENOMEM = "unable to mmap 25642314035 bytes from file <x.pt>: Cannot allocate memory (12)"


def rss_anon() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    gen = torch.Generator().manual_seed(0)
    weights = {
        "big.weight": torch.randn(4096, 4096, generator=gen).bfloat16(),  # 32 MiB
        "fp8.weight": torch.randn(512, 256, generator=gen).to(FP8_DTYPE),
        "bias": torch.randn(7, generator=gen),
        "norm.weight": torch.ones(3, dtype=torch.bfloat16),
    }
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"module": weights}, path)
    return path, weights


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_noreserve_load_equals_torch_load_and_stays_file_backed(checkpoint):
    path, weights = checkpoint
    before = rss_anon()
    loaded = load_noreserve(path)["module"]
    assert loaded.keys() == weights.keys() and all(same(loaded[k], v) for k, v in weights.items())
    # Comparing read every byte: a copy would have added the 32 MiB to anonymous memory, a mapping adds
    # file-backed pages only (the margin covers the comparison's temporaries and allocator noise).
    assert rss_anon() - before < 16 * MiB


def test_writing_a_mapped_tensor_never_changes_the_file(checkpoint):
    path, weights = checkpoint
    loaded = load_noreserve(path)["module"]
    loaded["big.weight"].add_(1.0)  # copy-on-write: this process's page, not the file's
    assert not same(loaded["big.weight"], weights["big.weight"])
    again = torch.load(path, weights_only=True)["module"]
    assert all(same(again[k], v) for k, v in weights.items())


def test_refused_mapping_is_retried_without_reservation(checkpoint, monkeypatch):
    path, weights = checkpoint
    real_load, calls = torch.load, []

    def refusing_load(*args, **kwargs):
        if kwargs.get("mmap"):
            raise RuntimeError(ENOMEM)
        return real_load(*args, **kwargs)

    def spy(p):
        calls.append(Path(p))
        return load_noreserve(p)

    monkeypatch.setattr(torch, "load", refusing_load)
    monkeypatch.setattr(loading, "load_noreserve", spy)
    state = loading.load_dit_state_dict(path)
    assert calls == [path]  # not the old fallback, which read the whole file into memory
    assert all(same(state[k], v) for k, v in weights.items())


def test_other_load_errors_are_not_mistaken_for_a_refused_mapping():
    assert is_mmap_refused(RuntimeError(ENOMEM))
    legacy = RuntimeError("mmap can only be used with files saved with `torch.save(x.pt, "
                          "_use_new_zipfile_serialization=True)`")
    assert not is_mmap_refused(legacy)
    assert not is_mmap_refused(RuntimeError("PytorchStreamReader failed reading zip archive"))
