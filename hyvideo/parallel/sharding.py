"""Split a token sequence over the sequence-parallel ranks and gather it back.

The image-token sequence (after patch embedding, order t -> h -> w) is padded at its end up to a multiple of
P = U*R and cut into P equal chunks; rank r holds chunk r. Unlike the original, which split the latent along
height or width and failed when neither was divisible by 2P (issue #179), this works for every video size;
attention is permutation-equivariant once each token keeps its own RoPE row, so the result is the same.
Padded tokens are excluded as attention keys (see ``attention.py``) and dropped by ``gather_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hyvideo.parallel.groups import SequenceParallelState, as_wire


@dataclass(frozen=True)
class TokenShard:
    """Where this rank's chunk of a padded global token sequence lies."""

    total_len: int
    world_size: int
    rank: int

    @property
    def local_len(self) -> int:
        """Tokens per rank, padding included (the same on every rank)."""
        return -(-self.total_len // self.world_size)

    @property
    def padded_len(self) -> int:
        return self.local_len * self.world_size

    @property
    def pad(self) -> int:
        """Zero tokens appended at the end of the global sequence."""
        return self.padded_len - self.total_len

    @property
    def start(self) -> int:
        """Global position of this rank's first token."""
        return self.rank * self.local_len

    @property
    def local_valid_len(self) -> int:
        """Real (non-padding) tokens in this rank's chunk; they come first in the chunk."""
        return max(0, min(self.local_len, self.total_len - self.start))

    def valid_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(local_len,) bool, True for real tokens of this rank's chunk, False for padding."""
        return torch.arange(self.local_len, device=device) < self.local_valid_len


def token_shard(total_len: int, state: SequenceParallelState) -> TokenShard:
    """Describe how a global sequence of `total_len` tokens is split for this rank."""
    if total_len < 1:
        raise ValueError(f"Cannot shard an empty sequence (total_len={total_len}).")
    return TokenShard(total_len=total_len, world_size=state.world_size, rank=state.rank)


def shard_tokens(x: torch.Tensor, dim: int, state: SequenceParallelState) -> tuple[torch.Tensor, int]:
    """Pad `x` along `dim` to a multiple of the world size with zeros and return this rank's chunk.

    Args:
        x: the full (replicated) tensor, e.g. image tokens (B, L_img, C) with dim=1.
        dim: the sequence dimension.
        state: from ``init_sequence_parallel``.

    Returns:
        (chunk, pad): chunk has ``ceil(L / P)`` entries along `dim` (contiguous); pad is the number of zero
        entries appended at the end of the global sequence (they live on the last rank(s)).
    """
    dim = dim % x.dim()
    shard = token_shard(x.shape[dim], state)
    work = as_wire(x)  # fp8 has no CPU pad kernel: pad its bytes (0x00 is +0.0)
    if shard.pad:
        pad_spec = [0, 0] * (x.dim() - 1 - dim) + [0, shard.pad]
        work = F.pad(work, pad_spec)
    chunk = work.narrow(dim, shard.start, shard.local_len).contiguous()
    return (chunk.view(x.dtype) if chunk.dtype != x.dtype else chunk), shard.pad


def gather_tokens(
    x_local: torch.Tensor, dim: int, state: SequenceParallelState, total_len: int
) -> torch.Tensor:
    """All-gather the chunks of every rank along `dim` and drop the padding: the inverse of shard_tokens.

    Args:
        x_local: this rank's chunk, ``ceil(total_len / P)`` long along `dim`, e.g. (B, L_loc, C).
        dim: the sequence dimension.
        state: from ``init_sequence_parallel``.
        total_len: the real global length (before padding).

    Returns:
        The full tensor with `total_len` entries along `dim`, identical on every rank.
    """
    dim = dim % x_local.dim()
    shard = token_shard(total_len, state)
    if x_local.shape[dim] != shard.local_len:
        raise ValueError(
            f"gather_tokens: chunk has {x_local.shape[dim]} tokens along dim {dim}, but a sequence of "
            f"{total_len} tokens over {state.world_size} rank(s) gives {shard.local_len} per rank. Pass the "
            f"total_len that was sharded."
        )
    if not state.enabled:
        return x_local.narrow(dim, 0, total_len)
    wire = as_wire(x_local)
    parts = [torch.empty_like(wire) for _ in range(state.world_size)]
    dist.all_gather(parts, wire, group=state.group)
    full = torch.cat(parts, dim=dim)
    if full.dtype != x_local.dtype:
        full = full.view(x_local.dtype)
    return full.narrow(dim, 0, total_len)


def shard_rope(
    freqs_cos: torch.Tensor, freqs_sin: torch.Tensor, state: SequenceParallelState
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard RoPE tables (L_img, D) like the image tokens, so each rank keeps its tokens' global positions.

    Padded rows are zero; they only rotate padding tokens, which are never attended to and are dropped.
    """
    if freqs_cos.shape != freqs_sin.shape:
        raise ValueError(
            f"RoPE tables differ in shape: cos {tuple(freqs_cos.shape)} vs sin {tuple(freqs_sin.shape)}."
        )
    return shard_tokens(freqs_cos, 0, state)[0], shard_tokens(freqs_sin, 0, state)[0]
