"""The one attention entry point of the DiT, and the registry of its backends.

Blocks call `attention(q, k, v, backend=..., key_mask=...)` and never branch on the backend. The backend name
is resolved once (`resolve_attention_backend`) when the model is built and passed down as a plain string.

Masks are boolean, True = "may attend":
* (B, 1, 1, L_k): a key mask, what the DiT blocks use. Its rows must be right-padded (ones, then zeros), as
  the DiT builds them ([image | valid text | padded text]).
* (B, 1, L_q, L_k): a full mask, what the token refiner uses.

A backend is `fn(q, k, v, key_mask) -> out` with q/k/v and out (B, L, H, D). Named backends live in a registry
(`register_attention_backend(name, fn, is_available)`); `attention()` also takes such a callable directly,
which is how a backend that needs per-forward context runs (the DiT's sequence-parallel attention object,
see hyvideo/parallel/dit.py), so blocks never branch on the kind of attention.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# What blocks pass as `backend`: a registered name, or a backend callable carrying its own context.
AttentionBackend = str | AttentionFn

# The flash-attn module once imported (FA3 `flash_attn_interface` preferred, then FA2 `flash_attn`), or None
# when neither imports. Filled lazily, so importing this file imports nothing optional.
_flash_module: list[ModuleType | None] = []


def _load_flash_module() -> ModuleType | None:
    if not _flash_module:
        module = None
        for name in ("flash_attn_interface", "flash_attn"):
            try:
                module = importlib.import_module(name)
                break
            except ImportError:
                continue
        _flash_module.append(module)
    return _flash_module[0]


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    # Some FA3 builds return (out, softmax_lse).
    return out[0] if isinstance(out, tuple) else out


def cu_seqlens_from_key_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """Varlen boundaries that split each sample into [valid keys] and [padding].

    Args:
        key_mask: (B, 1, 1, L) bool, each row ones then zeros.
    Returns:
        (2B + 1,) int32 on key_mask's device: [0, n_0, L, L + n_1, 2L, ...], with n_i the valid count. This is
        the original's `get_cu_seqlens`: valid tokens attend only to valid tokens, padding only to padding.
    """
    batch, length = key_mask.shape[0], key_mask.shape[-1]
    n_valid = key_mask.reshape(batch, length).sum(dim=1, dtype=torch.int32)
    starts = torch.arange(batch, dtype=torch.int32, device=key_mask.device) * length
    cu = torch.zeros(2 * batch + 1, dtype=torch.int32, device=key_mask.device)
    cu[1::2] = starts + n_valid
    cu[2::2] = starts + length
    return cu


def _flash_attention(q, k, v, key_mask):
    module = _load_flash_module()
    if module is None:
        raise ValueError("attention backend 'flash' needs flash-attn, which is not installed")
    if key_mask is not None and key_mask.shape[-2] != 1:
        # Parity: the original refiner always used SDPA with its (L, L) mask, which varlen cannot express.
        return _sdpa_attention(q, k, v, key_mask)
    if key_mask is None:
        return _first(module.flash_attn_func(q, k, v))
    batch, length = q.shape[:2]
    cu = cu_seqlens_from_key_mask(key_mask.to(q.device))
    out = module.flash_attn_varlen_func(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, length, length
    )
    return _first(out).unflatten(0, (batch, length))


def _sdpa_attention(q, k, v, key_mask):
    mask = None if key_mask is None else key_mask.to(q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def _vanilla_attention(q, k, v, key_mask):
    """softmax(q k^T / sqrt(D)) v written out, in float32 whatever the input dtype (a reference)."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        q32, k32, v32 = (x.float().transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
        scores = q32 @ k32.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, L_q, L_k)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.to(q.device), float("-inf"))
        out = scores.softmax(dim=-1) @ v32
    return out.transpose(1, 2).to(v.dtype)


def _flash_available() -> bool:
    return torch.cuda.is_available() and _load_flash_module() is not None


_BACKENDS: dict[str, AttentionFn] = {
    "flash": _flash_attention,
    "sdpa": _sdpa_attention,
    "vanilla": _vanilla_attention,
}
_AVAILABLE: dict[str, Callable[[], bool]] = {
    "flash": _flash_available,
    "sdpa": lambda: True,
    "vanilla": lambda: True,
}


def register_attention_backend(
    name: str, fn: AttentionFn, is_available: Callable[[], bool] | None = None
) -> None:
    """Add (or replace) a backend `fn(q, k, v, key_mask)` on (B, L, H, D) tensors (masks: module doc)."""
    if name == "auto":
        raise ValueError("'auto' is reserved for backend resolution")
    _BACKENDS[name] = fn
    _AVAILABLE[name] = is_available or (lambda: True)


def available_attention_backends() -> list[str]:
    """Names of the registered backends usable on this machine."""
    return [name for name in _BACKENDS if _AVAILABLE[name]()]


def resolve_attention_backend(name: str = "auto") -> str:
    """Turn a requested backend into a usable one: "auto" -> "flash" if flash-attn and CUDA, else "sdpa".

    Raises:
        ValueError naming the available backends when `name` is unknown or unusable here.
    """
    if name == "auto":
        chosen = "flash" if _AVAILABLE["flash"]() else "sdpa"
        logger.info("attention backend: %s (auto)", chosen)
        return chosen
    if name not in _BACKENDS or not _AVAILABLE[name]():
        reason = "unknown" if name not in _BACKENDS else "not available here"
        raise ValueError(
            f"attention backend {name!r} is {reason}; available: {available_attention_backends()} "
            "(flash needs flash-attn and a CUDA device)"
        )
    logger.info("attention backend: %s", name)
    return name


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: AttentionBackend,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention with the softmax scale 1/sqrt(D).

    Args:
        q, k, v: (B, L, H, D).
        backend: a resolved backend name (see `resolve_attention_backend`), or a backend callable
            `fn(q, k, v, key_mask) -> (B, L, H, D)` such as the DiT's sequence-parallel attention.
        key_mask: None, a (B, 1, 1, L) key mask or a (B, 1, L, L) full mask; bool, True = attend.
    Returns:
        (B, L, H * D) in v's dtype.
    """
    fn = backend if callable(backend) else _BACKENDS.get(backend)
    if fn is None:
        raise ValueError(f"attention backend {backend!r} is unknown; registered: {sorted(_BACKENDS)}")
    return fn(q, k, v, key_mask).flatten(2)
