"""Memory-mapping a `torch.save` checkpoint that is larger than RAM + swap.

`torch.load(path, weights_only=True, mmap=True)` maps the whole file private and writable. Linux's default
overcommit heuristic (vm.overcommit_memory = 0) refuses any single such mapping larger than RAM + swap with
ENOMEM, so the 25.6 GB bf16 DiT cannot be memory-mapped on a 24 GiB host, although reading it layer by layer (quantise at load)
needs far less. Mapping the file with MAP_NORESERVE skips that reservation: pages stay file-backed (the
kernel drops and re-reads them as it likes) until written, and a write copies the page privately, so the
file itself is never modified.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import torch

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python < 3.13 lacks the name; Linux's value


def is_mmap_refused(err: BaseException) -> bool:
    """Whether `torch.load(..., weights_only=True, mmap=True)` failed: the kernel refused the mapping."""
    message = str(err)
    return "unable to mmap" in message or "Cannot allocate memory" in message


def load_noreserve(path: str | os.PathLike) -> object:
    """`torch.load(path, map_location="cpu", weights_only=True, mmap=True)` with a MAP_NORESERVE mapping.

    Uses torch.serialization's `_load`, the call torch.load itself makes once it has mapped the file (same
    weights-only unpickler), with our mapping as the storage every tensor views.

    Raises:
        RuntimeError: not on Linux, the kernel refused even this mapping, or this torch has no `_load`
            taking `overall_storage` (a torch older than 2.1, or a newer one that changed it).
    """
    path = Path(path)
    if sys.platform != "linux":
        raise RuntimeError(f"cannot memory-map {path}: larger than RAM + swap (MAP_NORESERVE is Linux-only)")
    load = getattr(torch.serialization, "_load", None)
    reader_type = getattr(torch._C, "PyTorchFileReader", None)
    if load is None or reader_type is None:
        raise RuntimeError(f"cannot memory-map {path}: torch {torch.__version__} has no serialization._load")
    with open(path, "rb") as handle:
        try:
            mapped = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:
            raise RuntimeError(f"cannot memory-map {path}: {err.strerror}") from err
    # frombuffer holds a reference to `mapped`: the mapping lives as long as any tensor viewing it
    storage = torch.frombuffer(mapped, dtype=torch.uint8).untyped_storage()
    try:
        return load(reader_type(str(path)), "cpu", torch._weights_only_unpickler, overall_storage=storage,
                    encoding="utf-8")
    except TypeError as err:  # a torch whose _load no longer takes these arguments
        raise RuntimeError(f"cannot memory-map {path} with this torch {torch.__version__}: {err}") from err
