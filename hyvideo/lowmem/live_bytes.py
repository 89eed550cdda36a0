"""Count the bytes of live tensors, and their peak, while real or fake (FakeTensorMode) code runs.

`LiveBytes` is a TorchDispatchMode: every tensor an operator returns whose storage is new (not shared with
one of the operator's inputs: views, in-place results and `.to()` no-ops are not new) is counted from its
creation until its storage is freed. Tensors that existed before (weights, inputs) are only counted if
passed to `track`. Under FakeTensorMode nothing is allocated, so the peak of a full-size forward can be
measured on any machine; on real tensors the same counter measures the real run (the tracer's self-check,
tests/test_memory_trace.py).

The count is of tensor storages (what `torch.cuda.max_memory_allocated` would add, less the caching
allocator's rounding to 512-byte blocks), not of allocator reservations.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(values) -> list[torch.UntypedStorage]:
    return [v.untyped_storage() for v in tree_flatten(values)[0] if isinstance(v, torch.Tensor)]


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes and their peak, counted by storage (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()  # storage ids (StorageImpl addresses) being counted

    def track(self, *tensors: torch.Tensor) -> None:
        """Count tensors that already exist (e.g. a block's inputs held by its caller)."""
        for storage in _storages(tensors):
            self._count(storage)

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._counted:
            return
        nbytes = storage.nbytes()
        self._counted.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        if key in self._counted:
            self._counted.discard(key)
            self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {s._cdata for s in _storages((args, kwargs))}
        for storage in _storages(out):
            if storage._cdata not in inputs:
                self._count(storage)
        return out


@contextlib.contextmanager
def fake_tensors() -> Iterator[FakeTensorMode]:
    """A FakeTensorMode in which modules can be built and run at full size without allocating anything.

    `allow_non_fake_inputs` lets small real constants (e.g. scalars created at import) mix in.
    """
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def materialize_fake(module: torch.nn.Module, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Give a meta-device module empty tensors on `device`; call inside `fake_tensors()` (nothing allocated).

    Faster than building the module under FakeTensorMode (no weight initialisation runs), and keeps
    parameter types (an fp8 weight stays fp8).
    """
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device=device),
                                                           requires_grad=False)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = torch.empty_like(buf, device=device)
    return module
