"""Decode time and peak memory of hyvideo's causal VAE vs diffusers' AutoencoderKLHunyuanVideo (CPU).

Every case runs in a fresh subprocess (same random weights, same latents):
  * time: wall time of one `decode` after a small warm-up decode, min over --repeats runs;
  * peak RSS: the child's ru_maxrss (from os.wait4), and the decode's own working set = peak RSS during the
    decode minus RSS just before it (the peak is reset through /proc/self/clear_refs), max over runs.
Both sides use the official tile geometry (256 px / 32 latent tiles, stride 24 latent, 64 px blend) when
tiled, and no tiling at all when untiled. The outputs of the two sides are compared (rel max error).

Default: a 33-frame video (9 latent frames) at 288x288 and 384x384 px (2x2 spatial tiles of at most 32x32
latents when tiled) with block_out_channels reduced to (8, 16, 32, 32) and 8 GroupNorm groups, otherwise the
released architecture (2 layers per block, 16 latent channels). The full-width model takes many minutes per
decode on 2 CPU cores.

Usage: .venv/bin/python scripts/benchmark_vae.py [--sizes 288 384] [--frames 33] [--channels 8 16 32 32]
       [--groups 8] [--repeats 1]
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

    ref = (
        AutoencoderKLHunyuanVideo(
            latent_channels=LATENT_CHANNELS, block_out_channels=channels, norm_num_groups=groups
        )
        .eval()
        .requires_grad_(False)
    )
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

    def decode(z):
        out = model.decode(z)
        return out if isinstance(out, torch.Tensor) else out.sample

    with torch.inference_mode():
        decode(torch.randn(1, LATENT_CHANNELS, 2, 4, 4))  # warm-up
        gen = torch.Generator().manual_seed(1)
        lat = args.size // 8
        z = torch.randn(1, LATENT_CHANNELS, (args.frames - 1) // 4 + 1, lat, lat, generator=gen)
        base_kib = _status_kib("VmRSS")
        reset_ok = _reset_peak_rss()
        start = time.perf_counter()
        video = decode(z)
        seconds = time.perf_counter() - start
        peak_kib = _status_kib("VmHWM")
    if args.save:
        torch.save(video.contiguous(), args.save)
    delta = (peak_kib - base_kib) / 1024 if reset_ok else float("nan")
    print(json.dumps({"seconds": seconds, "decode_mib": delta, "shape": list(video.shape)}))


def _run_case(impl: str, tiled: str, size: int, args: argparse.Namespace, save: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, tiled, "--size", str(size)]
    cmd += [
        "--frames",
        str(args.frames),
        "--channels",
        *map(str, args.channels),
        "--groups",
        str(args.groups),
    ]
    cmd += ["--save", save] if save else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
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


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--sizes", type=int, nargs="+", default=[288, 384])
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 32])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "TILED"))
    parser.add_argument("--size", type=int)
    parser.add_argument("--save")
    args = parser.parse_args()
    if args.child:
        args.impl, args.tiled = args.child
        run_child(args)
        return

    import torch

    print(
        f"config: block_out_channels={tuple(args.channels)}, layers_per_block 2, {args.groups} groups, "
        f"16 latent ch; "
        f"{args.frames} frames; fp32 CPU, torch threads {torch.get_num_threads()}; repeats {args.repeats}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for tiled in ("tiled", "untiled"):
                res: dict[str, list[dict]] = {"ours": [], "diffusers": []}
                for rep in range(args.repeats):  # interleaved, so load changes hit both sides
                    for impl in ("ours", "diffusers"):
                        save = f"{tmp}/{impl}.pt" if rep == 0 else None
                        res[impl].append(_run_case(impl, tiled, size, args, save))
                ref, out = torch.load(f"{tmp}/diffusers.pt"), torch.load(f"{tmp}/ours.pt")
                rel = float((out - ref).abs().max() / ref.abs().max())
                rows.append((size, tiled, res, rel))
    _print_table(rows)


def _print_table(rows) -> None:
    head = (
        "| px | tiling | ours s | diffusers s | time ratio | ours decode MiB | diffusers decode MiB "
        "| mem ratio | ours peak RSS MiB | diffusers peak RSS MiB | rel err |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for size, tiled, res, rel in rows:
        t = {k: min(r["seconds"] for r in v) for k, v in res.items()}
        m = {k: max(r["decode_mib"] for r in v) for k, v in res.items()}
        p = {k: max(r["maxrss_mib"] for r in v) for k, v in res.items()}
        print(
            f"| {size} | {tiled} | {t['ours']:.2f} | {t['diffusers']:.2f} | {t['ours'] / t['diffusers']:.2f} "
            f"| {m['ours']:.0f} | {m['diffusers']:.0f} | {m['ours'] / m['diffusers']:.2f} "
            f"| {p['ours']:.0f} | {p['diffusers']:.0f} | {rel:.1e} |"
        )


if __name__ == "__main__":
    main()
