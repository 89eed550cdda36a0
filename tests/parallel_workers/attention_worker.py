"""torchrun worker: checks hyvideo.parallel on CPU/gloo for every U x R layout of its world size.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=N attention_worker.py RESULT_JSON N

Every rank runs every check; rank 0 writes {check name: metrics (worst over ranks)} to RESULT_JSON and the
pytest side (tests/test_parallel_attention.py) applies the tolerances. Inputs come from fixed seeds, so all
ranks build the same global q/k/v and each computes the single-process reference itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import hyvideo`

from hyvideo.parallel import (  # noqa: E402
    SequenceParallelState,
    broadcast_seed,
    destroy,
    gather_tokens,
    init_sequence_parallel,
    sequence_parallel_attention,
    shard_rope,
    shard_tokens,
    token_shard,
)

HEADS, HEAD_DIM, BATCH = 4, 16, 2
# name -> (image tokens, text valid lengths per sample, text tokens, dtype)
CASES = {
    "pad": (30, (5, 8), 8, torch.float32),  # 30 % 4 != 0: the padding path at world 4
    "odd": (31, (8, 3), 8, torch.float32),  # 31 % 2 != 0: the padding path at world 2
    "tiny": (5, (0, 3), 8, torch.float32),  # whole padding blocks, a sample without valid text
    "notext": (12, (), 0, torch.float32),  # no text tokens at all
    "bf16": (30, (5, 8), 8, torch.bfloat16),
}


def layouts(world: int) -> list[tuple[int, int]]:
    """Every (U, R) with U * R = world and U dividing the head count."""
    return [(u, world // u) for u in range(1, world + 1) if world % u == 0 and HEADS % u == 0]


def make_inputs(l_img: int, txt_lens: tuple[int, ...], l_txt: int, dtype: torch.dtype):
    """Global q, k, v (B, L_img + L_txt, H, D) and the text mask (B, L_txt), identical on every rank."""
    gen = torch.Generator().manual_seed(1234 + l_img)
    q, k, v = (torch.randn(BATCH, l_img + l_txt, HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in range(3))
    txt_mask = torch.zeros(BATCH, l_txt, dtype=torch.bool)
    for b, n in enumerate(txt_lens):
        txt_mask[b, :n] = True
    return q, k, v, txt_mask


def reference(q, k, v, txt_mask, l_img: int) -> torch.Tensor:
    """Single-process attention: every query sees all image keys and its sample's valid text keys."""
    key_mask = torch.cat([torch.ones(BATCH, l_img, dtype=torch.bool), txt_mask], dim=1)  # (B, L)
    out = F.scaled_dot_product_attention(
        q.float().transpose(1, 2),
        k.float().transpose(1, 2),
        v.float().transpose(1, 2),
        attn_mask=key_mask[:, None, None, :],
    )
    return out.transpose(1, 2).reshape(BATCH, q.shape[1], -1)  # (B, L, H*D)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_attention(name: str, state: SequenceParallelState) -> dict:
    """Shard, run sequence_parallel_attention, gather; compare with the reference on this rank."""
    l_img, txt_lens, l_txt, dtype = CASES[name]
    q, k, v, txt_mask = make_inputs(l_img, txt_lens, l_txt, dtype)
    shard = token_shard(l_img, state)
    local = []
    for t in (q, k, v):
        img_chunk, pad = shard_tokens(t[:, :l_img], 1, state)
        assert pad == shard.pad
        local.append(torch.cat([img_chunk, t[:, l_img:]], dim=1))
    out = sequence_parallel_attention(
        *local,
        num_img_tokens=shard.local_len,
        img_valid_len=l_img,
        txt_key_mask=txt_mask if l_txt else None,
        state=state,
    )
    img_full = gather_tokens(out[:, : shard.local_len], 1, state, l_img)
    txt_out = out[:, shard.local_len :].contiguous()
    txt_all = [torch.empty_like(txt_out) for _ in range(state.world_size)]
    dist.all_gather(txt_all, txt_out)
    ref = reference(q, k, v, txt_mask, l_img)
    return {
        "rel_img": rel(img_full, ref[:, :l_img]),
        "rel_txt": rel(txt_out, ref[:, l_img:]) if l_txt else 0.0,
        "txt_identical": all(torch.equal(t, txt_all[0]) for t in txt_all),
        "finite": bool(out.float().isfinite().all()),
        "dtype_ok": out.dtype == dtype
        and tuple(out.shape) == (BATCH, shard.local_len + l_txt, HEADS * HEAD_DIM),
    }


def check_shard_gather(state: SequenceParallelState) -> dict:
    """shard_tokens / gather_tokens / shard_rope are exact inverses, for several dims and dtypes."""
    gen = torch.Generator().manual_seed(7)
    exact, shapes_ok = True, True
    for length, dim, dtype in ((30, 1, torch.float32), (31, -1, torch.bfloat16), (3, 0, torch.float8_e4m3fn)):
        shape = [2, 3, 5]
        shape[dim] = length
        x = torch.randn(*shape, generator=gen).to(dtype)
        chunk, pad = shard_tokens(x, dim, state)
        back = gather_tokens(chunk, dim, state, length)
        exact &= back.dtype == dtype and torch.equal(back.view(torch.uint8), x.view(torch.uint8))
        shard = token_shard(length, state)
        shapes_ok &= chunk.shape[dim] == shard.local_len and pad == (-length) % state.world_size
        shapes_ok &= int(shard.valid_mask().sum()) == shard.local_valid_len
    cos, sin = torch.randn(30, 8, generator=gen), torch.randn(30, 8, generator=gen)
    cos_l, sin_l = shard_rope(cos, sin, state)
    exact &= torch.equal(gather_tokens(cos_l, 0, state, 30), cos)
    exact &= torch.equal(gather_tokens(sin_l, 0, state, 30), sin)
    return {"exact": bool(exact), "shapes_ok": bool(shapes_ok)}


def check_seed(state: SequenceParallelState) -> dict:
    """broadcast_seed: rank 0's draw (None) or rank 0's value reaches every rank."""
    drawn = broadcast_seed(None, state)
    given = broadcast_seed(100 + state.rank, state)  # ranks disagree; rank 0 wins
    seen: list = [None] * state.world_size
    dist.all_gather_object(seen, (drawn, given))
    return {"same_drawn": len({s[0] for s in seen}) == 1, "given": sorted({s[1] for s in seen})}


def check_bad_layout(state: SequenceParallelState) -> dict:
    """Every rank rejects a layout that does not fit the world size or the head count."""
    messages = {}
    for name, bad in (
        ("mismatch", lambda: init_sequence_parallel(2 * state.world_size, 1)),
        ("heads", lambda: state.check_num_heads(HEADS + 1)),
    ):
        try:
            bad()
            messages[name] = "accepted"
        except ValueError as err:
            messages[name] = str(err)
    expected_mismatch = f"= {2 * state.world_size}, but {state.world_size} process(es)"
    return {
        "mismatch_raised": expected_mismatch in messages["mismatch"],
        "heads_raised": f"number of attention heads ({HEADS + 1})" in messages["heads"],
    }


def worst(results: list[dict]) -> dict:
    """Combine per-rank metrics: max of errors, AND of flags."""
    merged = {}
    for key, value in results[0].items():
        values = [r[key] for r in results]
        if isinstance(value, bool):
            merged[key] = all(values)
        elif isinstance(value, float):
            merged[key] = max(values)
        else:
            merged[key] = values[0] if all(v == values[0] for v in values) else values
    return merged


def main() -> None:
    torch.set_num_threads(1)
    result_path, world = Path(sys.argv[1]), int(sys.argv[2])
    results: dict[str, dict] = {}
    # The first call creates the process group; the others reuse it and add their own subgroups.
    states = [init_sequence_parallel(u, r, timeout_s=60) for u, r in layouts(world)]
    for state in states:
        for name in CASES:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, check_attention(name, state))
            results[f"u{state.ulysses_degree}r{state.ring_degree}/{name}"] = worst(gathered)
    # states[-1] is pure Ulysses (U = world > 1), the layout the head-count check can reject.
    checks = (("shard_gather", check_shard_gather), ("seed", check_seed), ("bad_layout", check_bad_layout))
    for name, check in checks:
        gathered = [None] * world
        dist.all_gather_object(gathered, check(states[-1]))
        results[name] = worst(gathered)
    if states[0].is_main:
        result_path.write_text(json.dumps(results, indent=1))
    destroy(states[0])


if __name__ == "__main__":
    main()
