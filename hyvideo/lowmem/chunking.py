"""Token chunking for the DiT blocks: chunk sizes, chunk ranges, chunk-filled buffers and split linears.

Everything the DiT does outside attention is per token (LayerNorm, modulation, the linears, the activation,
RoPE, the gated residuals), so it can run on a slice of the tokens at a time with the same maths. The blocks
(hyvideo/modules/blocks.py) then keep only a few full-size tensors alive (the block input, q/k/v, the
attention output, the block output) instead of the ~22 hidden states of the unchunked single-stream block.

Chunk setting (`--dit-chunk-tokens`): None = automatic (`AUTO_CHUNK_TOKENS`, evened out over the sequence),
0 = off (the unchunked code path, bit-identical to before chunking existed), N > 0 = N tokens per chunk.
A sequence that fits one chunk always takes the unchunked path, so small videos are unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# At most this many tokens per chunk by default. At full size (D = 3072, D_mlp = 12288) the single block's
# linear1 output for one chunk is 8192 x 21504 x 2 bytes = 0.34 GiB in bf16, under half a 720p hidden state
# (0.68 GiB), and GEMMs of 8192 rows still run at full speed on a GPU.
AUTO_CHUNK_TOKENS = 8192


def check_chunk_setting(setting: int | None) -> int | None:
    """Validate a chunk setting (None, 0 or a positive token count); returns it unchanged."""
    if setting is not None and (isinstance(setting, bool) or not isinstance(setting, int) or setting < 0):
        raise ValueError(
            f"dit chunk tokens must be None (automatic), 0 (off) or a positive token count, got {setting!r}"
        )
    return setting


def resolve_chunk_tokens(setting: int | None, n_tokens: int) -> int:
    """Tokens per chunk for a sequence of `n_tokens` (>= n_tokens means: do not chunk).

    Args:
        setting: None (automatic), 0 (off) or N > 0 tokens per chunk.
        n_tokens: sequence length being chunked.
    """
    check_chunk_setting(setting)
    if setting == 0 or n_tokens <= 0:
        return max(n_tokens, 1)
    if setting is not None:
        return setting
    n_chunks = math.ceil(n_tokens / AUTO_CHUNK_TOKENS)
    return math.ceil(n_tokens / n_chunks)  # even chunks: no tiny remainder chunk


def token_ranges(start: int, stop: int, chunk: int) -> list[slice]:
    """Consecutive slices of at most `chunk` tokens covering [start, stop)."""
    return [slice(i, min(i + chunk, stop)) for i in range(start, stop, chunk)]


class TokenBuffers:
    """Tensors of `length` tokens along dim 1, filled chunk by chunk, allocated at the first write.

    Allocating from the first chunk's result gives the buffers exactly the dtype and trailing shape the
    unchunked code would have produced (autocast included).
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.tensors: tuple[torch.Tensor, ...] | None = None

    def write(self, tokens: slice, *pieces: torch.Tensor) -> None:
        if self.tensors is None:
            self.tensors = tuple(p.new_empty((p.shape[0], self.length, *p.shape[2:])) for p in pieces)
        for buffer, piece in zip(self.tensors, pieces, strict=True):
            buffer[:, tokens] = piece


def map_token_chunks(fn, ranges: list[slice], length: int) -> torch.Tensor:
    """Run `fn(tokens)` over every slice of `ranges` and gather the (B, n, ...) pieces into (B, length, ...)."""
    out = TokenBuffers(length)
    for tokens in ranges:
        out.write(tokens, fn(tokens))
    assert out.tensors is not None
    return out.tensors[0]


def dense_weight(linear: nn.Module) -> torch.Tensor | None:
    """The weight a linear layer multiplies by, if we know how to get it; None for other modules.

    A plain nn.Linear gives its weight, an FP8Linear its dequantised weight (the same tensor its forward
    builds). Anything else (a wrapper we do not know, or a layer with hooks) gives None, and callers then
    call the module itself.
    """
    if linear._forward_hooks or linear._forward_pre_hooks:
        # A hook changes what the layer computes or where its weight lives (a LoRA side path on fp8
        # weights, sequential offload moving the weight in): only calling the module honours it.
        return None
    if type(linear) is nn.Linear:
        return linear.weight
    from hyvideo.modules.fp8_optimization import FP8Linear, dequantize_weight  # lazy: it imports the DiT

    if type(linear) is FP8Linear:
        return dequantize_weight(linear.weight, linear.fp8_scale, linear.compute_dtype)
    return None


def linear_part(x: torch.Tensor, weight: torch.Tensor, columns: slice, bias: torch.Tensor | None = None):
    """x @ weight[:, columns]^T (+ bias): the contribution of one block of a linear layer's input features."""
    return F.linear(x, weight[:, columns], bias)
