"""How the DiT runs under sequence parallelism: split the image tokens, attend jointly, gather the output.

The DiT holds a `SequenceParallelState` (``model.enable_sequence_parallel(state)``) and, on every forward,
builds an `ImageTokenSplit` for its image-token count. The split is an identity in a single process, so the
forward has one code path::

    split = ImageTokenSplit.create(state, L_img, local_backend)
    img, freqs = split.scatter(img, freqs)          # (B, L_img, D) -> (B, L_loc, D); RoPE rows alike
    ... blocks call attention(q, k, v, backend=split.backend, key_mask=...) ...
    out = split.gather(final_layer(img_tokens))     # (B, L_loc, C') -> (B, L_img, C')

Text tokens stay replicated on every rank; the text stream computes the same values everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyvideo.parallel.attention import sequence_parallel_attention
from hyvideo.parallel.groups import SequenceParallelState
from hyvideo.parallel.sharding import TokenShard, gather_tokens, shard_rope, shard_tokens, token_shard


@dataclass(frozen=True)
class SequenceParallelAttention:
    """An attention backend object for `attention()`: joint [image chunk | text] attention over all ranks.

    Called like a registered backend, ``fn(q, k, v, key_mask) -> (B, L, H, D)``, with q/k/v holding this
    rank's `num_img_tokens` image tokens followed by the (replicated) text tokens.
    """

    state: SequenceParallelState
    num_img_tokens: int
    img_valid_len: int

    # Collectives stay out of torch.compile graphs (hyvideo/modules/compile.py): a compiled block runs this
    # call eagerly, between its two graphs. No effect without compile.
    @torch.compiler.disable
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        out = sequence_parallel_attention(
            q, k, v,
            num_img_tokens=self.num_img_tokens,
            img_valid_len=self.img_valid_len,
            txt_key_mask=self._text_key_mask(key_mask, q.shape[0], q.shape[1]),
            state=self.state,
        )  # (B, L, H * D)
        return out.unflatten(-1, (q.shape[2], q.shape[3]))

    def _text_key_mask(self, key_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
        """The text part (B, L_txt) of a (B, 1, 1, L) key mask; the image part is handled by padding."""
        if key_mask is None:
            return None
        if tuple(key_mask.shape) != (batch, 1, 1, length):
            raise ValueError(
                f"sequence-parallel attention takes a (B, 1, 1, L) key mask, got {tuple(key_mask.shape)} "
                f"for q of length {length}; a full (L, L) mask cannot be split across ranks"
            )
        return key_mask[:, 0, 0, self.num_img_tokens :]


@dataclass(frozen=True)
class ImageTokenSplit:
    """This rank's share of the image tokens for one forward (the identity when `state` is None)."""

    state: SequenceParallelState | None
    shard: TokenShard | None
    local_backend: object  # what attention() takes in a single process: a backend name or callable

    @classmethod
    def create(
        cls, state: SequenceParallelState | None, num_img_tokens: int, local_backend: object
    ) -> ImageTokenSplit:
        """Plan the split of `num_img_tokens` image tokens; no split when `state` is None or one process."""
        if state is None or not state.enabled:
            return cls(None, None, local_backend)
        return cls(state, token_shard(num_img_tokens, state), local_backend)

    @property
    def backend(self) -> object:
        """What the blocks pass to attention(): the parallel backend object, or the local backend."""
        if self.shard is None:
            return self.local_backend
        return SequenceParallelAttention(self.state, self.shard.local_len, self.shard.total_len)

    def scatter(
        self, img: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """img (B, L_img, D) and RoPE tables 2 x (L_img, D_h) -> this rank's (B, L_loc, D), 2 x (L_loc, D_h).

        The global sequence is zero-padded to a multiple of the world size; padded tokens are never
        attended to and `gather` drops them.
        """
        if self.shard is None:
            return img, freqs
        img_local, _ = shard_tokens(img, 1, self.state)
        return img_local, shard_rope(*freqs, self.state)

    def local_prefix(self, count: int) -> int:
        """How many of this rank's image tokens have a global index < `count` (they are its first ones)."""
        if self.shard is None:
            return count
        return max(0, min(count - self.shard.start, self.shard.local_len))

    def gather(self, out_local: torch.Tensor) -> torch.Tensor:
        """(B, L_loc, C) per-token outputs of this rank -> (B, L_img, C), identical on every rank."""
        if self.shard is None:
            return out_local
        return gather_tokens(out_local, 1, self.state, self.shard.total_len)
