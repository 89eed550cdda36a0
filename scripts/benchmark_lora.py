"""LoRA costs: reading + merging a rank-32 LoRA at full size, and the per-step cost of the fp8 side path.

    .venv/bin/python scripts/benchmark_lora.py [--rank 32] [--repeats 5] [--threads 2] [--skip-full]

1. Full size (HYVideo-T/2-cfgdistill, 12.8B parameters): a random rank-32 LoRA on every block Linear (the
   320 layers musubi-tuner trains) is written in the original layout (bf16), then read and mapped onto the
   DiT built on the meta device: file size, read + map time, parameters. Merging needs the real weights,
   which do not fit a 24 GB machine in bf16, so one double and one single block are materialised at full
   size (bf16, random N(0, 0.02) weights) and merged / unmerged: time and the host bytes kept to restore the
   weights exactly, per block. The whole-model figures are these x20 / x40 (an extrapolation, printed as
   such).
2. `small` DiT (scripts/benchmark_offload.py's config) with fp8 block linears: one forward without a LoRA
   and with a rank-32 LoRA on the side path, interleaved, min of `--repeats`; the ratio is the per-step
   overhead. CPU float32 compute.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hyvideo.constants import HUNYUAN_VIDEO_CONFIG, DiTConfig  # noqa: E402
from hyvideo.modules import HYVideoDiffusionTransformer  # noqa: E402
from hyvideo.modules.fp8_optimization import convert_fp8_linear, quantize_state_dict  # noqa: E402
from hyvideo.modules.lora import LoraStack, exception_bytes, merge_layer, unmerge_layer  # noqa: E402
from hyvideo.modules.lora_files import lora_layers, read_lora  # noqa: E402
from hyvideo.modules.models import MMDoubleStreamBlock, MMSingleStreamBlock  # noqa: E402

MiB = 2**20
SMALL = DiTConfig(hidden_size=512, heads_num=4, rope_dim_list=(16, 56, 56), mm_double_blocks_depth=4,
                  mm_single_blocks_depth=8, text_states_dim=256, text_states_dim_2=64, refiner_depth=1,
                  guidance_embed=True)
SMALL_LATENT, SMALL_TEXT = (16, 5, 32, 32), 64  # scripts/benchmark_offload.py's "small" input


def block_lora(model, rank: int, gen: torch.Generator, std_down: float, std_up: float) -> dict:
    """Original-layout LoRA on every block Linear of `model` (bf16, as LoRAs are shared)."""
    out = {}
    for name, layer in lora_layers(model).items():
        if name.startswith(("double_blocks", "single_blocks")):
            out[f"diffusion_model.{name}.lora_A.weight"] = (torch.randn(rank, layer.in_features, generator=gen)
                                                            * std_down).bfloat16()
            out[f"diffusion_model.{name}.lora_B.weight"] = (torch.randn(layer.out_features, rank, generator=gen)
                                                            * std_up).bfloat16()
    return out


def full_size_read(rank: int, tmp: Path) -> None:
    config = HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"]
    meta = HYVideoDiffusionTransformer(config, device="meta")
    path = tmp / "full_rank.safetensors"
    save_file(block_lora(meta, rank, torch.Generator().manual_seed(0), 0.01, 0.01), str(path))
    started = time.perf_counter()
    weights = read_lora(path, meta)
    elapsed = time.perf_counter() - started
    print(f"| full | read + map (sha256, checks) | {path.stat().st_size / MiB:.0f} MiB file, "
          f"{weights.num_parameters / 1e6:.0f} M params, {len(weights.pieces)} layers | {elapsed:.2f} s |")


def full_size_merge(rank: int) -> None:
    config = HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"]
    gen = torch.Generator().manual_seed(1)
    totals = {"double": config.mm_double_blocks_depth, "single": config.mm_single_blocks_depth}
    whole_time = whole_bytes = whole_copy = 0.0
    for kind, block_cls in (("double", MMDoubleStreamBlock), ("single", MMSingleStreamBlock)):
        block = block_cls(config, dtype=torch.bfloat16, device="meta").to_empty(device="cpu")
        merge_s = unmerge_s = kept = copy_bytes = 0.0
        wrong = elements = 0
        for name, layer in lora_layers(block).items():
            with torch.no_grad():
                layer.weight.normal_(0, 0.02, generator=gen)
            # Update rms ~10% of the weights' (0.02): down ~ N(0, 1/in), up ~ N(0, 0.002^2 / rank)
            down = torch.randn(rank, layer.in_features, generator=gen) / layer.in_features**0.5
            up = torch.randn(layer.out_features, rank, generator=gen) * 0.002 / rank**0.5
            started = time.perf_counter()
            record = merge_layer(layer, down, up, torch.device("cpu"))
            merge_s += time.perf_counter() - started
            started = time.perf_counter()
            unmerge_layer(layer, record)
            unmerge_s += time.perf_counter() - started
            kept += exception_bytes(record)
            copy_bytes += layer.weight.numel() * layer.weight.element_size()
            wrong += 0 if record.fix_index is None else record.fix_index.numel()
            elements += layer.weight.numel()
        n = totals[kind]
        print(f"| full, one {kind} block (measured) | merge / unmerge, CPU fp32 delta | "
              f"restore data {kept / MiB:.1f} MiB vs copy {copy_bytes / MiB:.0f} MiB "
              f"({100 * wrong / elements:.2f}% of elements) | {merge_s:.2f} s / {unmerge_s:.2f} s |")
        whole_time += merge_s * n
        whole_bytes += kept * n
        whole_copy += copy_bytes * n
        del block
    print(f"| full, 20 + 40 blocks (extrapolated x20/x40) | merge | restore data {whole_bytes / 2**30:.2f} GiB "
          f"vs copy {whole_copy / 2**30:.1f} GiB | {whole_time:.0f} s on this CPU |")


def small_side_path(rank: int, repeats: int, tmp: Path) -> None:
    torch.manual_seed(0)
    model = HYVideoDiffusionTransformer(SMALL, attention_backend="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    _, scale_map = quantize_state_dict(model.state_dict())
    convert_fp8_linear(model, scale_map, compute_dtype=torch.float32)
    path = tmp / "small.safetensors"
    save_file(block_lora(model, rank, torch.Generator().manual_seed(2), 0.02, 0.02), str(path))
    c, t, h, w = SMALL_LATENT
    gen = torch.Generator().manual_seed(3)
    args = (torch.randn(1, c, t, h, w, generator=gen), torch.tensor([500.0]),
            torch.randn(1, SMALL_TEXT, SMALL.text_states_dim, generator=gen), torch.ones(1, SMALL_TEXT),
            torch.randn(1, SMALL.text_states_dim_2, generator=gen), torch.tensor([6000.0]))
    stack = LoraStack(model)
    weights = read_lora(path, model)
    times = {"none": [], "side": []}
    with torch.no_grad():
        model(*args)  # warm-up
        for _ in range(repeats):
            for mode in ("none", "side"):
                if mode == "side":
                    stack.add(weights, 1.0)
                started = time.perf_counter()
                model(*args)
                times[mode].append(time.perf_counter() - started)
                stack.clear()
    none, side = min(times["none"]), min(times["side"])
    print(f"| small fp8, rank {rank} on {len(weights.pieces)} layers | one DiT step, fp8 no LoRA / side path | "
          f"{none:.3f} s / {side:.3f} s | side path x{side / none:.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-full", action="store_true", help="only the small side-path timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, rank {args.rank}")
    print("| config | what | size | time |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_full:
            full_size_read(args.rank, Path(tmp))
            full_size_merge(args.rank)
        small_side_path(args.rank, args.repeats, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
