"""Sequence parallelism (Ulysses x ring) for the DiT: process groups, token sharding, joint attention.

Typical use on every rank (launched with torchrun)::

    state = init_sequence_parallel(ulysses_degree, ring_degree, rank=..., world_size=..., local_rank=...)
    state.check_num_heads(num_heads)
    seed = broadcast_seed(seed, state)
    shard = token_shard(L_img, state)                            # L_loc = shard.local_len
    img_local, _ = shard_tokens(img, 1, state)                   # (B, L_img, C) -> (B, L_loc, C)
    cos_local, sin_local = shard_rope(freqs_cos, freqs_sin, state)   # (L_img, Dh) -> (L_loc, Dh)
    # in every block, q/k/v = [image chunk | text]: (B, L_loc + L_txt, H, Dh)
    out = sequence_parallel_attention(q, k, v, num_img_tokens=shard.local_len, img_valid_len=L_img,
                                      txt_key_mask=text_mask, state=state)   # (B, L_loc + L_txt, H*Dh)
    img = gather_tokens(img_local, 1, state, total_len=L_img)    # (B, L_loc, C) -> (B, L_img, C)
    if is_main_process(state): save(...)
    destroy(state)

The DiT does all of the above itself once given the state: ``model.enable_sequence_parallel(state)`` (see
``dit.py``: ImageTokenSplit / SequenceParallelAttention). The pipeline broadcasts the initial noise from
rank 0 (``broadcast_from_main``) and decodes the VAE tiles in parallel (``vae_decode.parallel_vae_decode``,
imported from its module so that importing the DiT does not import the VAE).
"""

from hyvideo.parallel.attention import attention_with_lse, merge_partials, sequence_parallel_attention
from hyvideo.parallel.dit import ImageTokenSplit, SequenceParallelAttention
from hyvideo.parallel.groups import (
    DEFAULT_TIMEOUT_S,
    SequenceParallelConfig,
    SequenceParallelState,
    barrier,
    broadcast_from_main,
    broadcast_seed,
    check_layout,
    check_num_heads,
    destroy,
    init_sequence_parallel,
    is_main_process,
    single_process_state,
)
from hyvideo.parallel.sharding import TokenShard, gather_tokens, shard_rope, shard_tokens, token_shard

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ImageTokenSplit",
    "SequenceParallelAttention",
    "SequenceParallelConfig",
    "SequenceParallelState",
    "TokenShard",
    "attention_with_lse",
    "barrier",
    "broadcast_from_main",
    "broadcast_seed",
    "check_layout",
    "check_num_heads",
    "destroy",
    "gather_tokens",
    "init_sequence_parallel",
    "is_main_process",
    "merge_partials",
    "sequence_parallel_attention",
    "shard_rope",
    "shard_tokens",
    "single_process_state",
    "token_shard",
]
