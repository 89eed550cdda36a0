"""The arithmetic and the report of scripts/benchmark.py: configurations, FLOPs per DiT forward, device peak
throughput, and the Markdown tables it prints."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from benchmark_offload import SIZES as OFFLOAD_SIZES
from benchmark_offload import synchronize

from hyvideo.constants import HUNYUAN_VIDEO_CONFIG, DiTConfig

MiB = 2**20

# Dense bf16 peak (TFLOPS) by device-name substring, first match wins (users_and_peers.md §4).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("A100", 312.0))
# Our attention backend -> the diffusers backend that does the same work (HunyuanVideo always passes a mask).
DIFFUSERS_ATTENTION = {"sdpa": "native", "flash": "flash_varlen", "vanilla": "_native_math"}
COMPONENT_COLUMNS = ("component", "impl", "config", "unit", "min s", "median s", "max/min", "runs",
                     "resident MiB", "peak MiB", "TFLOPS", "% of peak", "rel err vs diffusers")
RATIO_COLUMNS = ("ratio ours ÷ diffusers", "DiT step time", "DiT peak memory", "VAE decode time",
                 "VAE peak memory")


# ---- Configurations, FLOPs, device peak --------------------------------------------------------


def dit_configs() -> dict[str, DiTConfig]:
    from hyvideo.testing.tiny import TINY_DIT

    configs = {"test-tiny": TINY_DIT, **{k: v[0] for k, v in OFFLOAD_SIZES.items() if k != "full"}}
    configs["dit-bench"] = TINY_DIT.with_updates(  # scripts/benchmark_dit.py's config
        hidden_size=256, heads_num=4, mlp_width_ratio=4.0, rope_dim_list=(16, 24, 24),
        mm_double_blocks_depth=2, mm_single_blocks_depth=4, text_states_dim=256, text_states_dim_2=64,
        refiner_depth=2)
    configs["full"] = HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"]
    return configs


def text_encoder_configs(name: str) -> tuple[dict, dict]:
    """(LlamaConfig kwargs, CLIPTextConfig kwargs): the tiny test models, or LLaVA-Llama-3-8B + CLIP-L."""
    from hyvideo.testing.tiny import TINY_CLIP, TINY_LLAMA

    if name == "tiny":
        return TINY_LLAMA, TINY_CLIP
    llama = dict(TINY_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
    clip = dict(TINY_CLIP, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
    return llama, clip


def dit_flops(config: DiTConfig, n_tokens: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one DiT forward over n_tokens = image + text tokens.

    users_and_peers.md §4: per token and block (double or single) the linears are (4 + 2 * mlp_ratio) d^2
    MACs (12 d^2 at ratio 4); attention is 4 N^2 d per block. Modulation, embedders, refiner: < 1%, ignored.
    """
    d, blocks = config.hidden_size, config.mm_double_blocks_depth + config.mm_single_blocks_depth
    linear = 2 * (4 + 2 * config.mlp_width_ratio) * d * d * n_tokens * blocks
    return linear, 4 * n_tokens**2 * d * blocks


def latent_shape(height: int, width: int, frames: int) -> tuple[int, int, int]:
    if height % 16 or width % 16 or (frames - 1) % 4:
        raise ValueError(f"size {height}x{width}x{frames}: height and width must be multiples of 16 (8x VAE, "
                         "2x2 patches) and frames 1 or 4k+1")
    return (frames - 1) // 4 + 1, height // 8, width // 8


def table_peak(device_name: str) -> tuple[float, str] | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops, f"table ({key} dense bf16)"
    return None


def measure_matmul_tflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Best bf16 n^3 matmul throughput of this process (its thread count) on `device`."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


# ---- Report ---------------------------------------------------------------------------------------


def device_description(device: torch.device) -> str:
    if device.type != "cpu":
        return f"{device.type}: {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}"
    info = Path("/proc/cpuinfo").read_text()
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    model = names[0] if names else "?"
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return f"CPU {model}, {os.cpu_count()} cores, {mem / 2**20:.1f} GiB RAM"


def merge(results: list[tuple[dict, dict]]) -> dict[str, dict]:
    """{component: {"impls": {impl: {times, resident_mib, peak_mib, ...}}, "rel_err", ...}}"""
    merged: dict[str, dict] = {}
    for spec, res in results:
        comp = merged.setdefault(spec["component"], {"impls": {}})
        for impl, entry in res["impls"].items():
            target = comp["impls"].setdefault(impl, {"times": []})
            if spec["mode"] in ("time", "both"):
                target["times"] = entry["times"]
            target.update({k: v for k, v in entry.items() if k != "times"})
        comp.update({k: v for k, v in res.items() if k != "impls"})
    return merged


def fmt(value: float | None, spec: str = ".3g") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def component_rows(args: argparse.Namespace, merged: dict, peak: float | None) -> list[list[str]]:
    labels = {
        "dit": (f"{args.dit} {args.precision}{' fp8' if args.fp8 else ''}, attn {args.attention}, "
                f"offload {args.offload}", "s/step"),
        "text": (f"{args.text_encoder} {args.text_precision}", "s/encode"),
        "vae": (f"{args.vae} {args.vae_precision} {'tiled' if args.vae_tiling else 'untiled'}", "s/decode"),
    }
    rows = []
    for kind, comp in merged.items():
        config, unit = labels[kind]
        for impl, e in comp["impls"].items():
            times = e["times"]
            best = min(times) if times else None
            tflops = pct = None
            if kind == "dit" and best:
                tflops = sum(dit_flops(dit_configs()[args.dit], sum(comp["tokens"].values()))) / best / 1e12
                pct = 100 * tflops / peak if peak else None
            rel = comp.get("rel_err") if impl == "diffusers" else None
            rows.append([kind.upper() if kind != "text" else "text enc", impl, config, unit, fmt(best, ".4g"),
                         fmt(statistics.median(times) if times else None, ".4g"),
                         fmt(max(times) / best if best else None, ".2f"), str(len(times)),
                         fmt(e.get("resident_mib"), ".0f"),
                         fmt(e.get("peak_mib"), ".0f") + ("" if e.get("peak_reset", True) else " (HWM kept)"),
                         fmt(tflops, ".3g"),
                         fmt(pct, ".2g"),
                         fmt(rel, ".1e") + ("" if e.get("finite", True) else " (NON-FINITE)")])
    return rows


def ratio_row(merged: dict) -> list[str] | None:
    cells = []
    for kind in ("dit", "vae"):
        impls = merged.get(kind, {}).get("impls", {})
        ours, theirs = impls.get("ours", {}), impls.get("diffusers", {})
        if not theirs:
            cells += ["–", "–"]
            continue
        cells.append(fmt(min(ours["times"]) / min(theirs["times"]), ".3f"))
        cells.append(fmt(ours["peak_mib"] / theirs["peak_mib"], ".3f"))
    return None if all(c == "–" for c in cells) else ["value", *cells]


def markdown(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def header(args: argparse.Namespace, merged: dict, device: torch.device, peak: tuple[float, str] | None,
           loads: tuple[float, float]) -> list[str]:
    script = Path(__file__).resolve().with_name("benchmark.py")  # the command that prints this report
    argv = ["python", os.path.relpath(script, Path.cwd()), *sys.argv[1:]]
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t, h, w = latent_shape(args.height, args.width, args.frames)
    lines = [f"command: `{shlex.join(argv)}`",
             f"date: {date} · torch {torch.__version__} · {device_description(device)} · torch threads "
             f"{args.threads} · load average {loads[0]:.1f} at start, {loads[1]:.1f} at end",
             f"case: {args.height}x{args.width}x{args.frames} px → latent 16x{t}x{h}x{w}; "
             f"{args.repeats} timed run(s) after {args.warmup} warm-up"
             + (", interleaved with diffusers" if args.compare_diffusers else "")]
    if "dit" in merged:
        config, tokens = dit_configs()[args.dit], merged["dit"]["tokens"]
        linear, attn = dit_flops(config, sum(tokens.values()))
        params = merged["dit"]["impls"]["ours"]["params"]
        lines.append(f"DiT '{args.dit}': {params / 1e6:.1f}M params, hidden {config.hidden_size}, "
                     f"{config.mm_double_blocks_depth}+{config.mm_single_blocks_depth} blocks; "
                     f"{tokens['image_tokens']} image + {tokens['text_tokens']} text tokens; "
                     f"{(linear + attn) / 1e9:.4g} GFLOP/forward "
                     f"(attention {100 * attn / (linear + attn):.1f}%); "
                     f"{args.steps} step(s) per run")
    if peak:
        lines.append(f"peak throughput for '% of peak': {peak[0]:.4g} TFLOPS bf16, {peak[1]}")
    return lines


LEGEND = ("min/median/max over the timed runs (max/min = spread). resident = memory held once the model is "
          "built, peak = high-water mark of one run; both above the process's memory after its imports "
          "(CPU: VmRSS/VmHWM from /proc/self/status, HWM reset after building, in a fresh process per "
          "implementation; accelerator: memory_allocated/max_memory_allocated). TFLOPS from the FLOP formula "
          "of users_and_peers.md §4 and the min time. rel err = max|ours − diffusers| / max|diffusers| of "
          "the outputs.")
