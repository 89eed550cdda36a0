"""The one attention entry point of the DiT, and the registry of its backends.

Blocks call `attention(q, k, v, backend=..., key_mask=...)` and never branch on the backend. The backend name
is resolved once (`resolve_attention_backend`) when the model is built and passed down as a plain string.

Masks are boolean, True = "may attend":
* (B, 1, 1, L_k): a key mask, what the DiT blocks use. Its rows must be right-padded (ones, then zeros), as
  the DiT builds them ([image | valid text | padded text]).
* (B, 1, L_q, L_k): a full mask, what the token refiner uses.

Built-in backends: "sdpa" (torch), "vanilla" (float32 reference), and the optional GPU kernels "fa3"
(flash-attn 3, Hopper), "flash" (flash-attn 2, the original's) and "sage" (SageAttention); those run their
varlen entry with a key mask (valid tokens attend only to valid ones, as the original) and hand a full mask
to SDPA. "auto" picks fa3 > flash > sdpa by what is installed and what the card runs.

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

# Optional kernel packages, imported lazily (importing this file imports nothing optional): module name ->
# the module, or None when it does not import. Filled on first use.
_optional_modules: dict[str, ModuleType | None] = {}
# backend -> (module, what to install). fa3: flash-attn 3 (`flash_attn_interface`, built from the hopper/
# folder of Dao-AILab/flash-attention); flash: flash-attn 2, the original's kernel; sage: SageAttention.
_PACKAGES: dict[str, tuple[str, str]] = {
    "fa3": ("flash_attn_interface", "flash-attn 3 (module flash_attn_interface: build hopper/ of "
                                    "github.com/Dao-AILab/flash-attention)"),
    "flash": ("flash_attn", "flash-attn 2 (pip install flash-attn --no-build-isolation)"),
    "sage": ("sageattention", "SageAttention (pip install sageattention)"),
}
# Lowest compute capability each GPU kernel runs on: FA3 is Hopper-only, SageAttention 2 and FA2 need Ampere.
_MIN_CAPABILITY: dict[str, tuple[int, int]] = {"fa3": (9, 0), "flash": (8, 0), "sage": (8, 0)}
_AUTO_ORDER = ("fa3", "flash")  # on a GPU, the first usable one; else sdpa


def _optional_module(name: str) -> ModuleType | None:
    if name not in _optional_modules:
        try:
            _optional_modules[name] = importlib.import_module(name)
        except ImportError:
            _optional_modules[name] = None
    return _optional_modules[name]


def _gpu() -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of the current CUDA device, or None without one."""
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def _kernel_problem(backend: str) -> str | None:
    """Why a GPU kernel backend cannot run here (package, device, card), or None when it can."""
    module, install = _PACKAGES[backend]
    if _optional_module(module) is None:
        return f"needs {install}, which is not installed"
    gpu = _gpu()
    if gpu is None:
        return "runs on NVIDIA GPUs only and no CUDA device is visible (use sdpa)"
    name, capability = gpu
    need = _MIN_CAPABILITY[backend]
    if capability < need:
        return (f"needs compute capability >= {need[0]}.{need[1]}"
                f"{' (Hopper, e.g. H100)' if backend == 'fa3' else ''}; {name} has "
                f"{capability[0]}.{capability[1]} (use {'flash or ' if backend == 'fa3' else ''}sdpa)")
    return None


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    # FA3 (and FA2 with return_attn_probs) may return (out, softmax_lse).
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


def _varlen_or_dense(dense, varlen, q, k, v, key_mask):
    """Run a flash-style kernel: dense without a mask, varlen over [valid | padding] with a key mask.

    dense(q, k, v) on (B, L, H, D); varlen(q, k, v, cu_q, cu_k, max_q, max_k) on (B*L, H, D).
    """
    if key_mask is not None and key_mask.shape[-2] != 1:
        # Parity: the original refiner always used SDPA with its (L, L) mask, which varlen cannot express.
        return _sdpa_attention(q, k, v, key_mask)
    if key_mask is None:
        return _first(dense(q, k, v))
    batch, length = q.shape[:2]
    cu = cu_seqlens_from_key_mask(key_mask.to(q.device))
    out = varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, length, length)
    return _first(out).unflatten(0, (batch, length))


def _flash_kernel(backend: str):
    def run(q, k, v, key_mask):
        module = _optional_module(_PACKAGES[backend][0])
        if module is None:
            raise ValueError(f"attention backend {backend!r} {_kernel_problem(backend)}")
        return _varlen_or_dense(module.flash_attn_func, module.flash_attn_varlen_func, q, k, v, key_mask)

    run.__name__ = f"_{backend}_attention"
    return run


_flash_attention = _flash_kernel("flash")
_fa3_attention = _flash_kernel("fa3")


def _sage_attention(q, k, v, key_mask):
    """SageAttention (8-bit QK^T, fp16 PV): its dense NHD entry, or its varlen entry under a key mask.

    Its kernels take fp16/bf16 only: float32 inputs run in bf16 and the result is cast back.
    """
    module = _optional_module(_PACKAGES["sage"][0])
    if module is None:
        raise ValueError(f"attention backend 'sage' {_kernel_problem('sage')}")
    dtype = q.dtype
    if dtype == torch.float32:
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))

    def dense(q, k, v):
        return module.sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        return module.sageattn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False)

    return _varlen_or_dense(dense, varlen, q, k, v, key_mask).to(dtype)


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


_BACKENDS: dict[str, AttentionFn] = {
    "fa3": _fa3_attention,
    "flash": _flash_attention,
    "sage": _sage_attention,
    "sdpa": _sdpa_attention,
    "vanilla": _vanilla_attention,
}
_BUILTIN_KERNELS = {name: _BACKENDS[name] for name in _PACKAGES}
_AVAILABLE: dict[str, Callable[[], bool]] = {
    "fa3": lambda: _kernel_problem("fa3") is None,
    "flash": lambda: _kernel_problem("flash") is None,
    "sage": lambda: _kernel_problem("sage") is None,
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


def attention_backend_problem(name: str) -> str | None:
    """Why backend `name` cannot be used here, as a phrase ("needs ..., which is not installed"); None if it can.

    "auto" always can (it falls back to sdpa).
    """
    if name == "auto":
        return None
    if name not in _BACKENDS:
        return f"is unknown; available: {available_attention_backends()}"
    if name in _PACKAGES and _BACKENDS[name] is _BUILTIN_KERNELS.get(name):
        return _kernel_problem(name)
    return None if _AVAILABLE[name]() else f"is not available here; available: {available_attention_backends()}"


def resolve_attention_backend(name: str = "auto") -> str:
    """Turn a requested backend into a usable one: "auto" -> fa3, else flash, on a GPU that runs them; else sdpa.

    Raises:
        ValueError saying what to install or which card is needed, and naming the available backends, when
        `name` is unknown or unusable here.
    """
    if name == "auto":
        chosen = next((b for b in _AUTO_ORDER if _AVAILABLE[b]()), "sdpa")
        logger.info("attention backend: %s (auto)", chosen)
        return chosen
    problem = attention_backend_problem(name)
    if problem is not None:
        if "available:" not in problem:
            problem += f"; available: {available_attention_backends()}"
        raise ValueError(f"attention backend {name!r} {problem}")
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
