"""Giving memory back once a component is no longer needed (the text encoders after the last prompt).

A run of `sample_video.py` encodes its last prompt long before the DiT and the VAE are done: from then on the
LLM (15 GiB in fp16) and CLIP only hold memory, on the host under `--use-cpu-offload` (pinned, under block
offload) or on the GPU otherwise. Dropping every reference frees the tensors; this module then hands the
freed memory back to the system, which Python and the allocators would otherwise keep for reuse.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
from collections.abc import Iterable

import torch
from torch import nn

from .block_offload import empty_device_cache

logger = logging.getLogger(__name__)


def weight_bytes(modules: Iterable[nn.Module | None]) -> int:
    """Bytes of the distinct parameters and buffers of `modules` (shared tensors counted once)."""
    seen: dict[tuple[int, torch.device], int] = {}
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr(), tensor.device] = storage.nbytes()
    return sum(seen.values())


def trim_host_heap() -> None:
    """Collect garbage and hand glibc's freed heap back to the system (Linux; a no-op elsewhere)."""
    gc.collect()  # modules hold reference cycles (hooks, parents): they die here, not at `del`
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed arenas mapped otherwise
        except (OSError, AttributeError):
            pass


def return_freed_memory(device: torch.device | str) -> None:
    """Collect garbage, then hand freed memory back: glibc's heap, the pinned-host cache, the device cache."""
    trim_host_heap()
    empty_host_cache = getattr(torch.accelerator, "empty_host_cache", None)  # torch >= 2.12
    if empty_host_cache is not None and torch.accelerator.is_available():
        empty_host_cache()  # block offload's page-locked copies are cached by torch when freed
    empty_device_cache(device)
