"""Joint image+text attention with Ulysses x ring sequence parallelism, and the LSE attention under it.

Every rank holds q/k/v = [its image chunk | all text tokens] (text replicated). The result equals
single-process attention in which each query sees every real image token of every rank plus the valid text
tokens of its sample, and never padded image or text tokens.

Data flow on one rank (U = Ulysses degree, R = ring degree, h = H/U, Li = local image tokens, Lb = U*Li):
1. Ulysses all-to-all (one call for q, k, v): (B, Li, H, D) -> (B, h, Lb, D), i.e. ring block
   ``ring_rank`` for our heads. Text q/k/v are replicated, so they are only sliced to our heads.
2. Ring: R steps; at each, [image block queries | text queries] attend the K/V block in hand while that
   block is sent on to the next ring rank. Partials are merged with their log-sum-exp (LSE). Text K/V are
   attended once, in a separate partial with the text key mask (xfuser appends them at its last ring step).
3. Ulysses all-to-all back for the image outputs; the text outputs are all-gathered over the heads.

Text queries are replicated over the ring, so every ring rank merges their per-block partials in one
canonical order (text keys, then image blocks 0..R-1): text outputs are bitwise identical on every rank.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist

from hyvideo.parallel.groups import SequenceParallelState, check_num_heads

logger = logging.getLogger(__name__)

_MATH_CHUNK_ELEMS = 2**28  # score elements per query chunk in the math fallback (1 GiB in fp32)

Partial = tuple[torch.Tensor, torch.Tensor]  # (out (B, h, L, D), lse (B, h, L) fp32)


# --------------------------------------------------------------------------------------------------
# Attention that also returns the log-sum-exp
# --------------------------------------------------------------------------------------------------


@functools.cache
def _flash_attn_func():
    """flash_attn.flash_attn_func when flash-attn is installed, else None (it is optional)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> Partial:
    """Softmax attention that also returns the natural-log LSE of the scaled scores.

    Args:
        q: (B, H, Lq, D). k, v: (B, H, Lk, D), same dtype.
        key_mask: (B, Lk) bool, True = key may be attended; None = all keys.
        scale: softmax scale, default D ** -0.5.

    Returns:
        out (B, H, Lq, D) in q.dtype, lse (B, H, Lq) float32. A row with no valid key gives out 0 and
        lse -inf, so merging it with other partials contributes nothing.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.device.type == "cpu":
        out, lse = _cpu_flash(q, k, v, key_mask, scale)
    elif key_mask is None and q.dtype in (torch.float16, torch.bfloat16) and _flash_attn_func() is not None:
        out, lse = _flash_attn(q, k, v, scale)
    else:
        out, lse = _math_attention(q, k, v, key_mask, scale)
    if key_mask is not None:
        # A sample whose keys are all masked: the CPU kernel reports lse 0 there, which a merge would
        # count as real mass. Force the neutral element.
        empty = ~key_mask.any(dim=-1)[:, None, None]  # (B, 1, 1)
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty[..., None], 0)
    return out, lse


def _cpu_flash(q, k, v, key_mask, scale) -> Partial:
    """The CPU flash kernel: it returns (out, lse) and takes an additive mask of q's dtype."""
    attn_mask = None
    if key_mask is not None:
        zeros = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
        attn_mask = zeros.masked_fill(~key_mask, float("-inf"))[:, None, None, :]  # (B, 1, 1, Lk)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, attn_mask=attn_mask, scale=scale
    )
    return out, lse.float()


def _flash_attn(q, k, v, scale) -> Partial:
    """flash-attn 2 with return_attn_probs=True, which also returns softmax_lse (B, H, Lq)."""
    out, lse, _ = _flash_attn_func()(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=0.0, softmax_scale=scale, causal=False, return_attn_probs=True,
    )
    return out.transpose(1, 2), lse.float()


def _math_attention(q, k, v, key_mask, scale) -> Partial:
    """Explicit fp32 softmax attention with LSE, in query chunks to bound the score memory."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    chunk = max(1, _MATH_CHUNK_ELEMS // max(1, b * h * lk))
    kf, vf = k.float(), v.float()
    outs, lses = [], []
    for start in range(0, lq, chunk):
        scores = torch.matmul(q[:, :, start : start + chunk].float(), kf.transpose(-1, -2)) * scale
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, C)
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        outs.append(torch.matmul(torch.exp(scores - finite[..., None]), vf))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def merge_partials(a: Partial, b: Partial) -> Partial:
    """Combine two attention partials over disjoint key sets into one (out in float32).

    Rows whose lse is -inf must have out 0 (attention_with_lse guarantees it); two such rows merge to
    (0, -inf) instead of NaN.
    """
    out_a, lse_a = a
    out_b, lse_b = b
    lse = torch.logaddexp(lse_a, lse_b)
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # both -inf: weights become 0
    weight_a, weight_b = torch.exp(lse_a - ref)[..., None], torch.exp(lse_b - ref)[..., None]
    return out_a.float() * weight_a + out_b.float() * weight_b, lse


def _merge_all(parts: list[Partial]) -> Partial:
    """Merge partials left to right (a fixed order gives bitwise-identical results on every rank)."""
    acc = (parts[0][0].float(), parts[0][1])
    for part in parts[1:]:
        acc = merge_partials(acc, part)
    return acc


# --------------------------------------------------------------------------------------------------
# Ulysses: all-to-all between sequence and heads
# --------------------------------------------------------------------------------------------------


def _ulysses_scatter_heads(x: torch.Tensor, state: SequenceParallelState) -> torch.Tensor:
    """(T, B, Li, H, D) local tokens, all heads -> (T, B, H/U, U*Li, D): the ring block, our heads."""
    u = state.ulysses_degree
    t, b, li, heads, d = x.shape
    if u == 1:
        return x.permute(0, 1, 3, 2, 4)
    send = x.reshape(t, b, li, u, heads // u, d).permute(3, 0, 1, 2, 4, 5).contiguous()  # (U, T, B, Li, h, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=state.ulysses_group)
    # recv[s] holds the tokens of Ulysses rank s (chunk s of the block) for our heads.
    return recv.permute(1, 2, 4, 0, 3, 5).reshape(t, b, heads // u, u * li, d)


def _ulysses_gather_heads(out: torch.Tensor, state: SequenceParallelState) -> torch.Tensor:
    """(B, H/U, U*Li, D) block outputs for our heads -> (B, Li, H*D) our tokens, all heads."""
    u = state.ulysses_degree
    b, h, lb, d = out.shape
    li = lb // u
    if u == 1:
        return out.transpose(1, 2).reshape(b, li, h * d)
    send = out.reshape(b, h, u, li, d).permute(2, 0, 3, 1, 4).contiguous()  # (U, B, Li, h, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=state.ulysses_group)
    # recv[s] holds head group s of our tokens; head order is s * h + local head.
    return recv.permute(1, 2, 0, 3, 4).reshape(b, li, u * h * d)


def _gather_text_heads(txt_out: torch.Tensor, state: SequenceParallelState) -> torch.Tensor:
    """(B, H/U, Lt, D) text outputs for our heads -> (B, Lt, H*D), all-gathered over the Ulysses group."""
    b, h, lt, d = txt_out.shape
    if state.ulysses_degree > 1 and lt > 0:
        parts = [torch.empty_like(txt_out) for _ in range(state.ulysses_degree)]
        dist.all_gather(parts, txt_out.contiguous(), group=state.ulysses_group)
        txt_out = torch.cat(parts, dim=1)  # (B, H, Lt, D)
    return txt_out.transpose(1, 2).reshape(b, lt, state.ulysses_degree * h * d)


# --------------------------------------------------------------------------------------------------
# Ring: pass K/V blocks around, merge with the LSE
# --------------------------------------------------------------------------------------------------


def _start_ring_exchange(kv: torch.Tensor, state: SequenceParallelState) -> tuple[torch.Tensor, list]:
    """Send our K/V block to the next ring rank and receive the previous rank's, asynchronously."""
    recv = torch.empty_like(kv)
    ops = [
        dist.P2POp(dist.isend, kv, state.ring_peer(1), group=state.ring_group),
        dist.P2POp(dist.irecv, recv, state.ring_peer(-1), group=state.ring_group),
    ]
    return recv, dist.batch_isend_irecv(ops)


def _ring_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    txt_partial: Partial | None,
    num_img_queries: int,
    block_valid: list[int],
    state: SequenceParallelState,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend q over every ring block's K/V and the text partial; return fp32 (image out, text out).

    Args:
        q: (B, h, Lb + Lt, D) [our ring block's image queries | text queries].
        kv: (2, B, h, Lb, D) our ring block's image keys and values.
        txt_partial: q attended over the text keys (counted once), or None without text.
        num_img_queries: Lb.
        block_valid: real (non-padding) keys in each ring block; they are a prefix of the block.
    """
    r_deg = state.ring_degree
    img_acc: Partial | None = None
    txt_parts: list[Partial | None] = [None] * r_deg
    for step in range(r_deg):
        block = (state.ring_rank - step) % r_deg
        exchange = _start_ring_exchange(kv, state) if step < r_deg - 1 else None
        n_valid = block_valid[block]
        if n_valid > 0:  # a block of pure padding contributes nothing
            out, lse = attention_with_lse(q, kv[0, :, :, :n_valid], kv[1, :, :, :n_valid], scale=scale)
            img_part = (out[:, :, :num_img_queries], lse[:, :, :num_img_queries])
            img_acc = img_part if img_acc is None else merge_partials(img_acc, img_part)
            txt_parts[block] = (out[:, :, num_img_queries:], lse[:, :, num_img_queries:])
        if exchange is not None:
            kv, requests = exchange
            for request in requests:
                request.wait()
    if txt_partial is not None:
        out_t, lse_t = txt_partial
        img_acc = merge_partials(img_acc, (out_t[:, :, :num_img_queries], lse_t[:, :, :num_img_queries]))
        txt_parts.insert(0, (out_t[:, :, num_img_queries:], lse_t[:, :, num_img_queries:]))
    txt_out = _merge_all([p for p in txt_parts if p is not None])[0]
    return img_acc[0].float(), txt_out


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_img_tokens: int,
    state: SequenceParallelState,
    img_valid_len: int | None = None,
    txt_key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Joint attention over [image chunks of all ranks | text] as if it ran in one process.

    Args:
        q, k, v: (B, L_loc_img + L_txt, H, D), bf16/fp16/fp32 (not fp8). The first `num_img_tokens` are this
            rank's image chunk from ``shard_tokens`` (RoPE already applied); the rest are the text tokens,
            identical on every rank.
        num_img_tokens: L_loc_img, the same on every rank (``TokenShard.local_len``).
        state: from ``init_sequence_parallel`` (or ``single_process_state()``).
        img_valid_len: real image tokens in the global sequence (``TokenShard.total_len``); global positions
            at or past it are the zero padding that ``shard_tokens`` added and are never attended. None: no
            padding.
        txt_key_mask: (B, L_txt) bool, True for valid text tokens (right padding is False). None: all valid.
        scale: softmax scale, default D ** -0.5.

    Returns:
        (B, L_loc_img + L_txt, H * D) in q.dtype. Every query has attended all real image tokens of all ranks
        and the valid text tokens of its sample. Text rows are bitwise identical on every rank; rows of
        padded image tokens are finite but meaningless.
    """
    # 1. Validate and split [image | text]
    b, seq, heads, d = _validate(q, k, v, num_img_tokens, img_valid_len, txt_key_mask, state)
    scale = d**-0.5 if scale is None else scale
    li, lt = num_img_tokens, seq - num_img_tokens
    u, h = state.ulysses_degree, heads // state.ulysses_degree
    lb = u * li  # tokens per ring block
    total_valid = state.world_size * li if img_valid_len is None else img_valid_len
    block_valid = [max(0, min(lb, total_valid - j * lb)) for j in range(state.ring_degree)]

    # 2. Ulysses: image q/k/v -> our ring block for our heads; text sliced to our heads
    qkv_img = torch.stack([q[:, :li], k[:, :li], v[:, :li]])  # (3, B, Li, H, D)
    q_img, k_img, v_img = _ulysses_scatter_heads(qkv_img, state)  # (B, h, Lb, D) each
    head_slice = slice(state.ulysses_rank * h, (state.ulysses_rank + 1) * h)
    q_txt, k_txt, v_txt = (t[:, li:, head_slice].transpose(1, 2) for t in (q, k, v))  # (B, h, Lt, D)

    # 3. Ring over image blocks, plus the text keys once
    q_all = torch.cat([q_img, q_txt], dim=2)  # (B, h, Lb + Lt, D)
    txt_partial = None
    if lt > 0:
        mask = None if txt_key_mask is None else txt_key_mask.to(device=q.device, dtype=torch.bool)
        txt_partial = attention_with_lse(q_all, k_txt, v_txt, key_mask=mask, scale=scale)
    kv = torch.stack([k_img, v_img]).contiguous()  # (2, B, h, Lb, D)
    img_out, txt_out = _ring_attention(q_all, kv, txt_partial, lb, block_valid, state, scale)

    # 4. Back to our tokens with all heads
    img_out = _ulysses_gather_heads(img_out.to(q.dtype), state)  # (B, Li, H*D)
    txt_out = _gather_text_heads(txt_out.to(q.dtype), state)  # (B, Lt, H*D)
    return torch.cat([img_out, txt_out], dim=1)


def _validate(q, k, v, num_img_tokens, img_valid_len, txt_key_mask, state) -> tuple[int, int, int, int]:
    """Check shapes, dtype and the layout; return (B, L, H, D)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be (B, L, H, D) with the same shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}."
        )
    if not q.is_floating_point() or q.dtype.itemsize == 1 or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share a bf16/fp16/fp32 dtype (got {q.dtype}, {k.dtype}, {v.dtype}); upcast fp8 "
            f"activations before attention."
        )
    b, seq, heads, d = q.shape
    check_num_heads(heads, state.ulysses_degree)
    if not 1 <= num_img_tokens <= seq:
        raise ValueError(f"num_img_tokens={num_img_tokens} must be in [1, {seq}] (the sequence length).")
    padded = state.world_size * num_img_tokens
    if img_valid_len is not None and not 1 <= img_valid_len <= padded:
        raise ValueError(
            f"img_valid_len={img_valid_len} must be in [1, {padded}] ({state.world_size} ranks x "
            f"{num_img_tokens} local image tokens)."
        )
    if txt_key_mask is not None and tuple(txt_key_mask.shape) != (b, seq - num_img_tokens):
        raise ValueError(
            f"txt_key_mask must be (B, L_txt) = {(b, seq - num_img_tokens)}, got {tuple(txt_key_mask.shape)}."
        )
    return b, seq, heads, d
