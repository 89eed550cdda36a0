"""Step time and peak memory of one DiT forward: resident vs block offload (prefetch) vs sequential offload.

On a CUDA (or other accelerator) machine the blocks wait in pinned CPU memory and are copied in per forward;
peak memory is `max_memory_allocated`. Without an accelerator the CPU is both the offload and the onload
device: the hooks, copies and prefetch bookkeeping still run (so the overhead of the hook logic shows), but
no host-to-device transfer is measured and there is no memory figure.

    python scripts/benchmark_offload.py                  # accelerator if present, else CPU
    python scripts/benchmark_offload.py --size mid --repeats 5 --prefetch 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyvideo.constants import DiTConfig  # noqa: E402
from hyvideo.modules import HYVideoDiffusionTransformer  # noqa: E402
from hyvideo.lowmem.offload import BlockOffloader  # noqa: E402

# name -> (DiT config, latent (C, T, H, W), text tokens)
SIZES = {
    "tiny": (DiTConfig(hidden_size=128, heads_num=2, rope_dim_list=(16, 24, 24), mm_double_blocks_depth=2,
                       mm_single_blocks_depth=4, text_states_dim=64, text_states_dim_2=32, refiner_depth=1,
                       guidance_embed=True), (16, 3, 16, 16), 16),
    "small": (DiTConfig(hidden_size=512, heads_num=4, rope_dim_list=(16, 56, 56), mm_double_blocks_depth=4,
                        mm_single_blocks_depth=8, text_states_dim=256, text_states_dim_2=64, refiner_depth=1,
                        guidance_embed=True), (16, 5, 32, 32), 64),
    "mid": (DiTConfig(hidden_size=1536, heads_num=12, rope_dim_list=(16, 56, 56), mm_double_blocks_depth=8,
                      mm_single_blocks_depth=16, text_states_dim=1024, text_states_dim_2=256,
                      guidance_embed=True),
            (16, 9, 48, 80), 128),
    # The real DiT (12.8B parameters, 25.6 GB in bf16) at 544x960x33: only on a large accelerator.
    "full": (DiTConfig(guidance_embed=True), (16, 9, 68, 120), 256),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="Model and input size (default: mid on an accelerator, small on the CPU).")
    parser.add_argument("--device", default=None, help="Onload device (default: the accelerator, else cpu).")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="Weight/compute dtype (default: bf16 on an accelerator, fp32 on the CPU).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed forwards per mode (after one warm-up).")
    parser.add_argument("--prefetch", type=int, default=1, help="Blocks copied ahead in block mode.")
    parser.add_argument("--no-pin", action="store_true", help="Keep the host copies in pageable memory.")
    return parser.parse_args()


def inputs_for(size: str, device: torch.device, dtype: torch.dtype) -> dict:
    config, (c, t, h, w), n_text = SIZES[size]
    return {"x": torch.randn(1, c, t, h, w, device=device, dtype=dtype),
            "t": torch.tensor([500.0], device=device),
            "text_states": torch.randn(1, n_text, config.text_states_dim, device=device, dtype=dtype),
            "text_mask": torch.ones(1, n_text, device=device),
            "text_states_2": torch.randn(1, config.text_states_dim_2, device=device, dtype=dtype),
            "guidance": torch.tensor([6016.0], device=device)}


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def forward_once(
    model, inputs: dict, device: torch.device, *, warm_up: bool
) -> tuple[torch.Tensor, float, int | None]:
    """One timed forward (after an untimed one if `warm_up`); peak allocated bytes on an accelerator."""
    accel = device.type != "cpu"
    dtype = inputs["x"].dtype
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:  # as the pipeline runs the DiT
        if warm_up:
            model(**inputs)
        synchronize(device)
        if accel:
            torch.accelerator.reset_peak_memory_stats(device)
        started = time.perf_counter()
        out = model(**inputs)
        synchronize(device)
        seconds = time.perf_counter() - started
    return out, seconds, torch.accelerator.max_memory_allocated(device) if accel else None


@contextlib.contextmanager
def placed(model, mode: str, device: torch.device, args: argparse.Namespace):
    """The model resident on `device`, or offloaded with the given granularity, for the duration."""
    if mode == "resident":
        model.to(device)
        try:
            yield
        finally:
            model.to("cpu")
            if device.type != "cpu":
                torch.accelerator.empty_cache()
        return
    with BlockOffloader(model, onload_device=device, granularity=mode, prefetch=args.prefetch,
                        pin_memory=not args.no_pin):
        yield


def main() -> None:
    args = parse_args()
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    device = torch.device(args.device) if args.device else (accel or torch.device("cpu"))
    on_cpu = device.type == "cpu"
    size = args.size or ("small" if on_cpu else "mid")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if on_cpu else "bf16")]
    config = SIZES[size][0]
    torch.manual_seed(0)
    model = HYVideoDiffusionTransformer(config, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    inputs = inputs_for(size, device, dtype)
    _, _, t, h, w = inputs["x"].shape
    tokens = t * (h // 2) * (w // 2) + inputs["text_states"].shape[1]
    print(f"DiT '{size}': {n_params / 1e6:.1f}M params ({n_params * dtype.itemsize / 2**20:.0f} MiB), "
          f"{config.mm_double_blocks_depth}+{config.mm_single_blocks_depth} blocks, {tokens} tokens, "
          f"{dtype}, "
          f"device {device}, torch {torch.__version__}")
    if on_cpu:
        print("CPU: offload and onload device are both the CPU -- no transfer cost measured, no memory "
              "figure; the times show the hook/copy bookkeeping only.")

    # Modes are interleaved (and rotated) round by round so that a drifting machine load biases none of them.
    modes = ("resident", "block", "sequential")
    outputs, times, peaks = {}, {m: [] for m in modes}, {m: None for m in modes}
    for round_index in range(args.repeats):
        for mode in modes[round_index % 3:] + modes[: round_index % 3]:  # rotate who goes first
            with placed(model, mode, device, args):
                out, seconds, peak = forward_once(model, inputs, device, warm_up=round_index == 0)
            outputs.setdefault(mode, out)
            times[mode].append(seconds)
            if peak is not None:
                peaks[mode] = max(peak, peaks[mode] or 0)

    reference = outputs["resident"]
    print(f"\n{'mode':>22} {'median s/forward':>17} {'min':>8} {'vs resident':>12} {'peak MiB':>10} "
          f"{'max |diff|':>11}")
    base = statistics.median(times["resident"])
    for mode in modes:
        label = mode + (f" (prefetch {args.prefetch})" if mode == "block" else "")
        peak_text = "n/a (CPU)" if peaks[mode] is None else f"{peaks[mode] / 2**20:.0f}"
        diff = (outputs[mode].float() - reference.float()).abs().max().item()
        median = statistics.median(times[mode])
        print(f"{label:>22} {median:>17.4f} {min(times[mode]):>8.4f} {median / base:>11.2f}x {peak_text:>10} "
              f"{diff:>11.3g}")

if __name__ == "__main__":
    main()
