"""fp8 compute for the DiT's block linears (`--fp8-gemm`): `torch._scaled_mm` on the e4m3 weights.

Plain `--use-fp8` (FP8Linear) dequantises each weight to bf16 and runs a bf16 matmul: fp8 saves memory, not
time. With `enable_fp8_gemm(model, device)` every FP8Linear becomes an `FP8GemmLinear`, which also quantises
the activation and multiplies in fp8:

    x (M, K) -> s_x = max|x_row| / 448 per row (or max|x| / 448 per tensor),  x8 = e4m3(x / s_x)
    y = _scaled_mm(x8, w8^T, s_x, s_w) + bias        (accumulated in float32, returned in x's dtype)

with w8 and s_w the stored fp8 weight and its per-layer scale (from `_fp8_map.pt`, or quantised at load).
The weights are the same tensors; only the activation rounding is new: E4M3 keeps 3 mantissa bits, so each
activation moves by up to 2^-4 of its value, the price of the fp8 tensor cores (about twice the bf16 FLOP
rate on Ada / Hopper). Opt-in, near-lossless, never the default.

Activation scale granularity: per row ("rowwise", one scale per token) where the backend supports it (CUDA
compute capability >= 9.0; the CPU from torch 2.13, probed once), else per tensor (compute capability 8.9,
older CPU builds). Below 8.9 there are no fp8
tensor cores: `fp8_gemm_granularity` raises a one-line error naming the card.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from .fp8_optimization import FP8_DTYPE, FP8_E4M3_MAX, FP8Linear

logger = logging.getLogger(__name__)

GRANULARITIES = ("rowwise", "tensor")
MIN_CAPABILITY = (8, 9)  # Ada Lovelace: the first fp8 tensor cores
ROWWISE_CAPABILITY = (9, 0)  # Hopper: row-wise scaled fp8 GEMM kernels


def fp8_gemm_granularity(device: torch.device | str) -> str:
    """How activations are scaled on `device`: "rowwise" or "tensor".

    Raises:
        ValueError: the device has no fp8 matmul (a GPU below compute capability 8.9, or another backend).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return "rowwise" if cpu_supports_rowwise() else "tensor"
    module = torch.get_device_module(device.type)
    capability = getattr(module, "get_device_capability", None)
    if capability is None or torch.version.hip is not None:
        raise ValueError(f"--fp8-gemm runs on the CPU or on NVIDIA GPUs of compute capability >= 8.9, "
                         f"not on {device.type}; drop --fp8-gemm (--use-fp8 alone still halves the weights)")
    major_minor = tuple(capability(device))
    if major_minor < MIN_CAPABILITY:
        name = module.get_device_name(device)
        raise ValueError(
            f"--fp8-gemm needs fp8 tensor cores (compute capability >= 8.9: RTX 40xx, L4, L40S, H100, ...); "
            f"{name} has {major_minor[0]}.{major_minor[1]}: drop --fp8-gemm (--use-fp8 alone still works)"
        )
    return "rowwise" if major_minor >= ROWWISE_CAPABILITY else "tensor"


@functools.cache
def cpu_supports_rowwise() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes row-wise scales (torch 2.13 does; 2.11 asserts)."""
    x8 = torch.ones(16, 16, dtype=FP8_DTYPE)
    try:
        torch._scaled_mm(x8, x8.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def quantize_activation(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (e4m3 x / s, s): s float32 (M, 1) per row or () per tensor, max|x| / 448 (1 for zeros).

    Three passes over x (the max-abs reduction, the float32 division, the cast), not six: on a GPU this runs
    memory-bound before every fp8 matmul. The result is the textbook x.float() / s clamped to ±448, bit for
    bit (tests/test_fp8_speed.py): max|x| is exact in x's dtype, the division is float32 either way, and
    |x / s| <= 448 up to an ulp, which the e4m3 cast rounds to 448 (it turns only values >= 464 into NaN).
    """
    rowwise = granularity == "rowwise"
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1 if rowwise else None, keepdim=rowwise).float()
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    # A (M, 1) or (1, 1) divisor keeps the division in float32 (a 0-d one would leave it in x's dtype).
    x8 = torch.div(x, scale if rowwise else scale.reshape(1, 1)).to(FP8_DTYPE)
    return x8, scale


class FP8GemmLinear(FP8Linear):
    """An FP8Linear that multiplies in fp8 (`torch._scaled_mm`) instead of dequantising its weight."""

    def __init__(self, *args, granularity: str = "rowwise", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity

    @classmethod
    def from_fp8_linear(cls, layer: FP8Linear, granularity: str) -> FP8GemmLinear:
        """A layer holding the same weight, bias and scale tensors as `layer` (nothing is copied)."""
        new = cls(layer.in_features, layer.out_features, layer.bias is not None,
                  compute_dtype=layer.compute_dtype, device="meta", granularity=granularity)
        new.weight = layer.weight
        new.bias = layer.bias
        new.fp8_scale = layer.fp8_scale
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        # Like F.linear in FP8Linear: the autocast dtype under autocast, else the input's dtype.
        kind = x.device.type
        out_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        # 1. Quantise the activation: (M, K) e4m3 and its float32 scale(s)
        x8, x_scale = quantize_activation(x.reshape(-1, self.in_features), self.granularity)
        # 2. w8^T (K, N) is a column-major view of the stored (N, K) weight, as _scaled_mm wants it
        w_scale = self.fp8_scale.float()
        if self.granularity == "rowwise":
            w_scale = w_scale.reshape(1, 1).expand(1, self.out_features).contiguous()  # (1, N)
        out = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
        # 3. Bias in the output dtype, then the leading dims back
        if self.bias is not None:
            out = out + self.bias.to(out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, granularity={self.granularity}"


def enable_fp8_gemm(model: nn.Module, device: torch.device | str) -> int:
    """Swap every FP8Linear of `model` for an FP8GemmLinear sharing its tensors; returns how many.

    Call it before block offload is attached (the offloader tracks the modules that own each tensor).

    Args:
        model: a DiT loaded with `load_fp8_dit` (or converted with `convert_fp8_linear`).
        device: where the model will compute (decides the activation scale granularity).
    Raises:
        ValueError: no FP8Linear layers (the model was not loaded with --use-fp8), or no fp8 GEMM on `device`.
    """
    granularity = fp8_gemm_granularity(device)
    targets = [(name, m) for name, m in model.named_modules() if type(m) is FP8Linear]
    if not targets:
        raise ValueError("--fp8-gemm needs the fp8 DiT: the model has no FP8Linear layers (add --use-fp8)")
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8GemmLinear.from_fp8_linear(layer, granularity))
    logger.info("fp8 GEMM: %d block linears use torch._scaled_mm (%s activation scales)", len(targets),
                granularity)
    return len(targets)
