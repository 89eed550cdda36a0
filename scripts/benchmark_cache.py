"""Step caches on random weights: DiT block evaluations, wall time and final-latent error vs uncached.

Every policy samples the same video (same DiT, prompt embeddings and noise) with the denoising loop of the
pipeline (no text encoders, no VAE: output_type="latent"); the uncached run is the baseline measured in the
same process. Block evaluations are counted with forward hooks on every double and single block.

    .venv/bin/python scripts/benchmark_cache.py --size small --steps 50 --threads 2
    .venv/bin/python scripts/benchmark_cache.py --size tiny --steps 50 --cache magcache teacache

Random weights are not the real checkpoint: the signals TeaCache and the first-block cache watch behave
differently, and the published speed-ups (MagCache 2.8x, TeaCache 2.1x at 720p) and their quality can only
be confirmed with the real weights. Output: the command, the machine, a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import torch  # noqa: E402
from benchmark_offload import SIZES  # noqa: E402

from hyvideo.diffusion import FlowMatchDiscreteScheduler  # noqa: E402
from hyvideo.diffusion.cache import CACHE_POLICIES, CacheConfig  # noqa: E402
from hyvideo.diffusion.pipelines import HunyuanVideoPipeline, TextConditions  # noqa: E402
from hyvideo.modules import HYVideoDiffusionTransformer  # noqa: E402
from hyvideo.testing.tiny import randomize_  # noqa: E402


def build(size: str, device: torch.device) -> tuple[HunyuanVideoPipeline, TextConditions, tuple]:
    config, latent, text_tokens = SIZES[size]
    dit = HYVideoDiffusionTransformer(config, dtype=torch.float32, attention_backend="sdpa", device=device)
    randomize_(dit.eval(), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    cond = TextConditions(torch.randn(1, text_tokens, config.text_states_dim, generator=gen).to(device),
                          torch.ones(1, text_tokens, dtype=torch.long, device=device),
                          torch.randn(1, config.text_states_dim_2, generator=gen).to(device))
    pipe = HunyuanVideoPipeline(vae=None, text_encoder=None, text_encoder_2=None, transformer=dit,
                                scheduler=FlowMatchDiscreteScheduler(shift=7.0), dit_dtype=torch.float32,
                                vae_dtype=torch.float32, use_autocast=False)
    return pipe, cond, latent


def sample(pipe, cond, latent, steps: int, cache: CacheConfig | None) -> tuple[torch.Tensor, dict | None,
                                                                              float]:
    _, t, h, w = latent
    started = time.perf_counter()
    out = pipe(prompt_conditions=cond, height=h * 8, width=w * 8, video_length=(t - 1) * 4 + 1,
               num_inference_steps=steps, generator=[torch.Generator().manual_seed(2)], output_type="latent",
               show_progress=False, cache=cache)
    if pipe.device.type != "cpu":
        torch.accelerator.synchronize(pipe.device)
    return out.latents, out.step_cache, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", choices=[s for s in SIZES if s != "full"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cache", nargs="+", default=[c for c in CACHE_POLICIES if c != "none"],
                   choices=CACHE_POLICIES[1:])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pipe, cond, latent = build(args.size, device)
    blocks = [*pipe.transformer.double_blocks, *pipe.transformer.single_blocks]
    calls = [0]
    for block in blocks:
        block.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    with torch.no_grad():
        sample(pipe, cond, latent, 1, None)  # warm-up
        calls[0] = 0
        base, _, base_s = sample(pipe, cond, latent, args.steps, None)
        base_calls = calls[0]
        rows = [("none (baseline)", "-", args.steps, base_calls, 1.0, base_s, 1.0, 0.0)]
        for policy in args.cache:
            calls[0] = 0
            cache = CacheConfig(policy)
            latents, record, seconds = sample(pipe, cond, latent, args.steps, cache)
            err = float((latents - base).abs().max() / base.abs().max())
            rows.append((policy, cache.effective_threshold, len(record["computed_steps"]), calls[0],
                         calls[0] / base_calls, seconds, seconds / base_s, err))
    print("$ python scripts/benchmark_cache.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch "
          f"{torch.__version__}, device {device}; DiT '{args.size}' ({len(blocks)} blocks), latent "
          f"{latent}, {args.steps} steps, fp32, random weights\n")
    print("| policy | threshold | computed steps | block evals | evals ÷ uncached | wall s "
          "| wall ÷ uncached | rel err of final latents |")
    print("|---|---|---|---|---|---|---|---|")
    for name, thr, steps, evals, ratio, seconds, wall_ratio, err in rows:
        print(f"| {name} | {thr} | {steps} of {args.steps} | {evals} | {ratio:.2f} | {seconds:.2f} | "
              f"{wall_ratio:.2f} | {err:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
