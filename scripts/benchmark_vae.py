"""Decode time and peak memory of hyvideo's causal VAE vs diffusers' AutoencoderKLHunyuanVideo (CPU, fp32).

Each (implementation, tiling, size) case runs in a fresh subprocess with the same random weights and latents:
  * time: a warm-up decode of a tiny latent, then --decodes decodes of the benchmark latent; the minimum
    wall time and the minimum process CPU time (all threads) are reported. CPU time is less sensitive than
    wall time to other processes competing for the cores.
  * memory: "decode MiB" = peak RSS during the decodes minus the RSS just before them (the kernel's peak is
    reset through /proc/self/clear_refs), i.e. what decoding itself needs; "peak RSS" = the child's whole
    ru_maxrss (torch, diffusers and the weights included), read with os.wait4 for that child alone. Children
    run with MALLOC_MMAP_THRESHOLD_=131072 so that freed tensors leave the RSS immediately.
Tiled runs use the official geometry on both sides (256 px / 32 latent tiles, stride 24 latent, 64 px
blend; diffusers via enable_tiling(256, 256, 64, 192, 192, 48)); untiled runs disable every kind of tiling.
The two outputs of each case are compared (rel max error).

Default: a 33-frame video (9 latent frames) at 288x288 and 384x384 px (2x2 spatial tiles of at most 32x32
latents when tiled), block_out_channels reduced to (8, 16, 32, 32) with 8 GroupNorm groups, otherwise the
released architecture (2 layers per block, 16 latent channels): the full-width model takes many minutes per
decode on 2 CPU cores.

Usage: .venv/bin/python scripts/benchmark_vae.py [--sizes 288 384] [--frames 33] [--channels 8 16 32 32]
       [--groups 8] [--decodes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LATENT_CHANNELS = 16
IMPLS = ("ours", "diffusers")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _build(impl: str, channels: tuple[int, ...], groups: int, tiled: bool):
    import torch

    from hyvideo.vae import AutoencoderKLCausal3D, VAEConfig

    torch.manual_seed(0)
    config = VAEConfig(block_out_channels=channels, norm_num_groups=groups, latent_channels=LATENT_CHANNELS)
    ours = AutoencoderKLCausal3D(config).eval().requires_grad_(False)
    if impl == "ours":
        ours.enable_tiling() if tiled else ours.disable_tiling()
        return ours
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import AutoencoderKLHunyuanVideo

    ref = AutoencoderKLHunyuanVideo(
        latent_channels=LATENT_CHANNELS, block_out_channels=channels, norm_num_groups=groups
    )
    ref.eval().requires_grad_(False)
    ref.load_state_dict(ours.state_dict(), strict=True)
    del ours
    if tiled:  # the official geometry (diffusers_peer.md §2.2)
        ref.enable_tiling(256, 256, 64, 192, 192, 48)
    else:
        ref.use_tiling = False
        ref.use_framewise_decoding = False
    return ref


def run_child(args: argparse.Namespace) -> None:
    import torch

    model = _build(args.impl, tuple(args.channels), args.groups, args.tiled == "tiled")

    def decode(z: torch.Tensor) -> torch.Tensor:
        out = model.decode(z)
        return out if isinstance(out, torch.Tensor) else out.sample

    walls, cpus = [], []
    with torch.inference_mode():
        decode(torch.randn(1, LATENT_CHANNELS, 2, 4, 4))  # warm-up
        lat = args.size // 8
        gen = torch.Generator().manual_seed(1)
        z = torch.randn(1, LATENT_CHANNELS, (args.frames - 1) // 4 + 1, lat, lat, generator=gen)
        base_kib = _status_kib("VmRSS")
        reset_ok = _reset_peak_rss()
        for _ in range(args.decodes):
            video = None  # free the previous output first, as a caller would
            wall, cpu = time.perf_counter(), time.process_time()
            video = decode(z)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        peak_kib = _status_kib("VmHWM")
    if args.save:
        torch.save(video.contiguous(), args.save)
    decode_mib = (peak_kib - base_kib) / 1024 if reset_ok else float("nan")
    print(json.dumps({"wall": min(walls), "cpu": min(cpus), "decode_mib": decode_mib}))


def _run_case(impl: str, tiled: str, size: int, args: argparse.Namespace, save: str) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, tiled, "--size", str(size), "--save", save]
    cmd += ["--frames", str(args.frames), "--channels", *map(str, args.channels)]
    cmd += ["--groups", str(args.groups), "--decodes", str(args.decodes)]
    # A fixed mmap threshold makes glibc return every freed tensor buffer to the OS at once, so RSS tracks
    # live tensors; with the default dynamic threshold the measured peaks swing by +-20% between runs.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072"}
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        stdout = proc.stdout.read()
        proc.stdout.close()
        # wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would be the max over all children so far).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{impl} {tiled} {size}px failed:\n{err.read()}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["maxrss_mib"] = usage.ru_maxrss / 1024
    return result


def _print_table(rows: list[tuple[int, str, dict[str, dict], float]]) -> None:
    head = (
        "| px | tiling | wall s ours / diffusers | ratio | CPU s ours / diffusers | ratio "
        "| decode MiB ours / diffusers | ratio | peak RSS MiB ours / diffusers | rel err |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for size, tiled, res, rel in rows:
        o, d = res["ours"], res["diffusers"]
        print(
            f"| {size} | {tiled} | {o['wall']:.2f} / {d['wall']:.2f} | {o['wall'] / d['wall']:.2f} "
            f"| {o['cpu']:.2f} / {d['cpu']:.2f} | {o['cpu'] / d['cpu']:.2f} "
            f"| {o['decode_mib']:.0f} / {d['decode_mib']:.0f} | {o['decode_mib'] / d['decode_mib']:.2f} "
            f"| {o['maxrss_mib']:.0f} / {d['maxrss_mib']:.0f} | {rel:.1e} |"
        )


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--sizes", type=int, nargs="+", default=[288, 384], help="square size in px")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 32])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--decodes", type=int, default=2, help="timed decodes per case (min is reported)")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "TILING"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.impl, args.tiled = args.child
        run_child(args)
        return

    import torch

    print(
        f"config: block_out_channels={tuple(args.channels)}, layers_per_block 2, {args.groups} groups, "
        f"16 latent channels; {args.frames} frames; fp32 CPU, {torch.get_num_threads()} torch threads; "
        f"min of {args.decodes} decodes per case"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for tiled in ("tiled", "untiled"):
                res = {impl: _run_case(impl, tiled, size, args, f"{tmp}/{impl}.pt") for impl in IMPLS}
                out = torch.load(f"{tmp}/ours.pt", weights_only=True)
                ref = torch.load(f"{tmp}/diffusers.pt", weights_only=True)
                rows.append((size, tiled, res, float((out - ref).abs().max() / ref.abs().max())))
    _print_table(rows)


if __name__ == "__main__":
    main()
