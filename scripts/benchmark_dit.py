"""Time our DiT forward against diffusers' HunyuanVideoTransformer3DModel on the CPU, same weights.

Small config (hidden 256, 4 heads, 2 double + 4 single blocks), latent 1x16x5x32x32 (1280 image tokens) and
64 text tokens. Runs are interleaved (alternating which side goes first); each side reports its minimum.

    .venv/bin/python scripts/benchmark_dit.py [--repeats 10] [--threads 1] [--valid-text 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers import HunyuanVideoTransformer3DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from hyvideo.constants import DiTConfig  # noqa: E402
from hyvideo.modules import HYVideoDiffusionTransformer  # noqa: E402
from hyvideo.testing.peers import diffusers_transformer  # noqa: E402

CONFIG = DiTConfig(
    hidden_size=256,
    heads_num=4,
    rope_dim_list=(16, 24, 24),
    mm_double_blocks_depth=2,
    mm_single_blocks_depth=4,
    text_states_dim=256,
    text_states_dim_2=64,
    guidance_embed=True,
)


def build_pair(seed: int = 0) -> tuple[HYVideoDiffusionTransformer, HunyuanVideoTransformer3DModel]:
    torch.manual_seed(seed)
    ours = HYVideoDiffusionTransformer(CONFIG, attention_backend="sdpa").eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    theirs = diffusers_transformer(CONFIG, ours.state_dict())
    return ours, theirs


def make_inputs(valid_text: int) -> tuple[torch.Tensor, ...]:
    mask = torch.zeros(1, 64)
    mask[:, :valid_text] = 1
    return (
        torch.randn(1, 16, 5, 32, 32),
        torch.tensor([700.0]),
        torch.randn(1, 64, CONFIG.text_states_dim),
        mask,
        torch.randn(1, CONFIG.text_states_dim_2),
        torch.tensor([6016.0]),
    )


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="interleaved runs per side")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--valid-text", type=int, default=64, help="valid text tokens of the 64 (rest padded)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours, theirs = build_pair()
    inputs = make_inputs(args.valid_text)
    run_ours = lambda: ours(*inputs)  # noqa: E731
    run_theirs = lambda: theirs(*inputs, return_dict=False)[0]  # noqa: E731
    times_ours, times_theirs = [], []
    with torch.inference_mode():
        run_ours(), run_theirs()  # warm-up
        for i in range(args.repeats):  # alternate which side goes first, so neither gets a warmer cache
            for side in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
                if side == "ours":
                    t, out_ours = timed(run_ours)
                    times_ours.append(t)
                else:
                    t, out_theirs = timed(run_theirs)
                    times_theirs.append(t)
    rel = float((out_ours - out_theirs).abs().max() / out_theirs.abs().max())
    best_ours, best_theirs = min(times_ours), min(times_theirs)
    print(
        f"config: hidden {CONFIG.hidden_size}, heads {CONFIG.heads_num}, "
        f"{CONFIG.mm_double_blocks_depth} double + {CONFIG.mm_single_blocks_depth} single; "
        f"latent 1x16x5x32x32; text 64 ({args.valid_text} valid); "
        f"threads {args.threads}; {args.repeats} interleaved runs"
    )
    print(f"ours      min {best_ours * 1e3:8.1f} ms")
    print(f"diffusers min {best_theirs * 1e3:8.1f} ms")
    print(f"ratio ours/diffusers {best_ours / best_theirs:.3f}   (output rel err {rel:.2e})")


if __name__ == "__main__":
    main()
