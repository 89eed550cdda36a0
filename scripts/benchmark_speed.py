"""Compiled ÷ eager DiT step time (and fp8 GEMM ÷ fp8 dequantise), interleaved in one process per case.

    .venv/bin/python scripts/benchmark_speed.py --dit dit-bench small --precision fp32 bf16 --threads 1
    .venv/bin/python scripts/benchmark_speed.py --dit dit-bench --precision bf16 --fp8 --threads 1

For each (DiT config, precision) a fresh subprocess builds one random-weight DiT (scripts/benchmark.py's
builder) and the inputs of scripts/benchmark.py (--height x --width x --frames, --text-tokens valid text
tokens), then times one Euler step (one DiT forward under autocast, as the pipeline runs it) per variant:

* eager / compile: the same model, its blocks pointed at the eager forward or at the compiled one
  (hyvideo.modules.compile); the compile itself (the first compiled call, minus one eager step) is reported
  apart and not in the step time;
* with --fp8: the fp8 model (dequantise path, `--use-fp8`) and a twin sharing its weights with fp8 GEMM
  layers (`--fp8-gemm`), plus each compiled.

After one untimed warm-up per variant, --repeats rounds run every variant once each, the order rotating every
round (so drift in the machine's load hits all variants alike). Reported: min and median s/step and the ratio
of each variant's min to the baseline's min (eager, or fp8 eager), and the max relative difference of its
output against the baseline. Runs on the accelerator when there is one (--device). CPU numbers say nothing
about a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import torch  # noqa: E402
from benchmark import build_ours_dit, dit_work  # noqa: E402
from benchmark_offload import synchronize  # noqa: E402
from benchmark_report import dit_configs, latent_shape  # noqa: E402

from hyvideo.modules.compile import COMPILE_MODES, compile_dit_blocks, uncompile_dit_blocks  # noqa: E402
from hyvideo.modules.fp8_gemm import enable_fp8_gemm  # noqa: E402


def _toggle(model: torch.nn.Module, forwards: dict) -> None:
    """Point the blocks at the compiled forwards (a dict from `_compile`) or, if empty, at the eager ones."""
    uncompile_dit_blocks(model)
    for block, forward in forwards.items():
        block.forward = forward


def _compile(model: torch.nn.Module, mode: str) -> dict:
    compiled = compile_dit_blocks(model, mode=mode)
    forwards = {b: vars(b)["forward"] for b in compiled.blocks}
    uncompile_dit_blocks(model)
    return forwards


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    _, run = dit_work(spec, device)
    base = build_ours_dit(spec).to(device)
    models = {"eager": base}
    if spec["fp8"]:
        gemm = copy.deepcopy(base)
        enable_fp8_gemm(gemm, device)
        models = {"fp8": base, "fp8-gemm": gemm}
    variants: dict[str, tuple[torch.nn.Module, dict]] = {}
    for name, model in models.items():
        variants[name] = (model, {})
        if spec["no_compile"]:
            continue
        variants["compile" if name == "eager" else f"{name} + compile"] = (
            model, _compile(model, spec["compile_mode"]))
    result: dict = {"variants": {}}
    outputs = {}
    for name, (model, fwd) in variants.items():  # warm-up; the compiled ones compile here
        _toggle(model, fwd)
        start = time.perf_counter()
        outputs[name] = run("ours", model, 1)
        synchronize(device)
        result["variants"][name] = {"first_s": time.perf_counter() - start, "times": []}
    order = list(variants)
    for round_index in range(spec["repeats"]):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            model, fwd = variants[name]
            _toggle(model, fwd)
            synchronize(device)
            start = time.perf_counter()
            run("ours", model, 1)
            synchronize(device)
            result["variants"][name]["times"].append(time.perf_counter() - start)
    baseline = order[0]
    ref = outputs[baseline].double()
    for name, entry in result["variants"].items():
        entry["rel_err"] = float((outputs[name].double() - ref).abs().max() / ref.abs().max())
    return result


def report(spec: dict, result: dict) -> list[str]:
    variants = result["variants"]
    baseline = next(iter(variants))
    base_min, base_median = min(variants[baseline]["times"]), statistics.median(variants[baseline]["times"])
    rows = []
    for name, entry in variants.items():
        t_min, t_median = min(entry["times"]), statistics.median(entry["times"])
        compile_s = entry["first_s"] - base_median if "compile" in name else None
        rows.append(
            f"| {spec['dit']} {spec['precision']}, {spec['threads']} | {name} | {t_min:.4f} | {t_median:.4f} | "
            f"**{t_min / base_min:.3f}** | {t_median / base_median:.3f} | "
            f"{'' if compile_s is None else f'{compile_s:.1f}'} | {entry['rel_err']:.1e} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dit", nargs="+", default=["dit-bench", "small"], choices=list(dit_configs()))
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--fp8", action="store_true", help="compare fp8 GEMM with the fp8 dequantise path")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    p.add_argument("--no-compile", action="store_true", help="only the eager variants (e.g. fp8 GEMM alone)")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--attention", default="sdpa", help="a backend name (auto, fa3, flash, sage, sdpa, vanilla)")
    p.add_argument("--device", default=None, help="default: the accelerator if any, else cpu")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    try:
        latent_shape(args.height, args.width, args.frames)
    except ValueError as err:
        p.error(str(err))
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    device = args.device or str(accel or "cpu")
    print(f"command: {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}")
    print()
    print("| config, dtype, threads | variant | min s/step | median s/step | **min ratio** | median ratio | "
          "compile s | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for dit in args.dit:
        for precision in args.precision:
            spec = dict(dit=dit, precision=precision, fp8=args.fp8, attention=args.attention, steps=1,
                        height=args.height, width=args.width, frames=args.frames, text_tokens=args.text_tokens,
                        threads=args.threads, repeats=args.repeats, compile_mode=args.compile_mode,
                        no_compile=args.no_compile,
                        device=device)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{dit} {precision}: child failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            print("\n".join(report(spec, json.loads(proc.stdout.strip().splitlines()[-1]))), flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; ratios are against the first variant of each case")
    return 0


if __name__ == "__main__":
    sys.exit(main())
