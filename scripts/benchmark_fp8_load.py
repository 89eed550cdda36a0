"""Full-size fp8 loading benchmark: peak memory of `load_fp8_dit` on a 13 GB checkpoint, and one CPU forward.

    .venv/bin/python scripts/benchmark_fp8_load.py [--tmp-dir /tmp] [--threads 2]
    .venv/bin/python scripts/benchmark_fp8_load.py --bf16 [--depth 4 8]   # --use-fp8 given bf16 weights

With --bf16 the checkpoint is written in bf16 without a scale map, and the child measures the loader's
quantise-at-load path: peak RSS against the loaded fp8 model's size (what the fp8 pair holds) and against the
bf16 file. --depth keeps the full width with fewer blocks (the full bf16 file is 25 GB).

1. Writes a random HYVideo-T/2-cfgdistill DiT in the official fp8 format into a temporary folder
   (`mp_rank_00_model_states_fp8.pt` wrapped under "module": the 320 block linears as float8_e4m3fn, the rest
   bf16; plus `mp_rank_00_model_states_fp8_map.pt`). Tensors are generated one at a time into a memory-mapped
   scratch file, so the whole model is never held in RAM (nor ever exists in bf16).
2. In a fresh subprocess, loads it with `hyvideo.modules.fp8_optimization.load_fp8_dit` on the CPU and reports
   the peak resident set size (VmHWM, file-backed pages included) against the file size (target <= 1.15x),
   then runs one forward with latent 1x16x1x4x4 (4 image tokens) and 8 text tokens.
3. Deletes the temporary files.

Needs about 30 GB of free disk (the scratch file and the checkpoint exist together for a moment) and several
minutes. This is a benchmark, not a test. Exit status 2 (one line) when the disk is too small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hyvideo.constants import HUNYUAN_VIDEO_CONFIG, DiTConfig  # noqa: E402
from hyvideo.modules import HYVideoDiffusionTransformer  # noqa: E402
from hyvideo.modules.fp8_optimization import (  # noqa: E402
    FP8_DTYPE,
    fp8_layer_names,
    load_fp8_dit,
    quantize_weight,
)

MODEL = "HYVideo-T/2-cfgdistill"
WEIGHTS_NAME = "mp_rank_00_model_states_fp8.pt"
MAP_NAME = "mp_rank_00_model_states_fp8_map.pt"
BF16_NAME = "mp_rank_00_model_states.pt"
MIN_FREE_BYTES = 30 * 10**9
WEIGHT_STD = 0.02  # dequantised weight scale: keeps the random 60-block forward finite
POOL_STD = 112.0  # fp8 pool values ~ N(0, 112^2), clamped at 448 (4 sigma)
GiB = 2**30


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, in bytes."""
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[key] = int(value.split()[0]) * 1024
    return out


# --------------------------------------------------------------------------------------------------
# Writing the checkpoint
# --------------------------------------------------------------------------------------------------


def _layout(specs: list[tuple[str, torch.Size, torch.dtype]]) -> tuple[list[int], int]:
    """Byte offsets (64-aligned) of each tensor in the scratch file, and its total size."""
    offsets, cursor = [], 0
    for _, shape, dtype in specs:
        offsets.append(cursor)
        nbytes = shape.numel() * dtype.itemsize
        cursor += (nbytes + 63) // 64 * 64
    return offsets, cursor


def _fill_fp8(target: np.ndarray, pool: np.ndarray, rng: np.random.Generator) -> None:
    """Fill with chunks of the fp8 pool taken at random offsets (fast; values ~ quantised normals)."""
    done = 0
    while done < target.size:
        start = int(rng.integers(0, pool.size // 2))
        count = min(target.size - done, pool.size - start)
        target[done : done + count] = pool[start : start + count]
        done += count


def bench_config(depth: tuple[int, int] | None) -> DiTConfig:
    """The full-size architecture, or its full width with (double, single) blocks."""
    config = HUNYUAN_VIDEO_CONFIG[MODEL]
    if depth is None:
        return config
    return config.with_updates(mm_double_blocks_depth=depth[0], mm_single_blocks_depth=depth[1])


def write_checkpoint(
    folder: Path, seed: int = 0, *, bf16: bool = False, depth: tuple[int, int] | None = None
) -> tuple[Path, int]:
    """Write the random fp8 checkpoint pair (or, with `bf16`, one bf16 file) into `folder`.

    Returns (weights path, parameter count).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = HYVideoDiffusionTransformer(bench_config(depth), device="meta")
    fp8_keys = set() if bf16 else {f"{name}.weight" for name in fp8_layer_names(model)}
    specs = [
        (key, t.shape, FP8_DTYPE if key in fp8_keys else torch.bfloat16) for key, t in model.state_dict().items()
    ]
    del model
    offsets, total = _layout(specs)
    pool_scale = torch.tensor(1.0 / POOL_STD)
    pool = quantize_weight(torch.randn(2**24), pool_scale).view(torch.uint8).numpy()

    scratch = folder / "scratch.bin"
    with open(scratch, "wb") as handle:
        handle.truncate(total)
    state_dict: dict[str, torch.Tensor] = {}
    scale_map: dict[str, torch.Tensor] = {}
    for (key, shape, dtype), offset in zip(specs, offsets):
        nbytes = shape.numel() * dtype.itemsize
        buffer = np.memmap(scratch, dtype=np.uint8, mode="r+", offset=offset, shape=(nbytes,))
        if dtype == FP8_DTYPE:
            _fill_fp8(buffer, pool, rng)
            jitter = float(rng.uniform(0.5, 2.0))
            scale_map[key.removesuffix(".weight")] = torch.tensor(WEIGHT_STD / POOL_STD * jitter)
        else:
            is_norm = len(shape) == 1 and "norm" in key
            values = torch.ones(shape.numel()) if is_norm else torch.randn(shape.numel()) * WEIGHT_STD
            buffer[:] = values.bfloat16().view(torch.uint8).numpy()
        state_dict[key] = torch.from_numpy(buffer).view(dtype).view(shape)
    weights_path = folder / (BF16_NAME if bf16 else WEIGHTS_NAME)
    torch.save({"module": state_dict}, weights_path)
    if not bf16:
        torch.save(scale_map, folder / MAP_NAME)
    n_params = sum(t.numel() for t in state_dict.values())
    del state_dict
    scratch.unlink()
    return weights_path, n_params


# --------------------------------------------------------------------------------------------------
# Loading and one forward (in a fresh process)
# --------------------------------------------------------------------------------------------------


def child(weights_path: Path, threads: int, depth: tuple[int, int] | None = None) -> None:
    """Load with the fp8 loader, run one forward, print one JSON line of measurements.

    A bf16 file (no scale map) takes the loader's quantise-at-load path.
    """
    torch.set_num_threads(threads)
    result: dict[str, float] = {"rss_start": proc_status()["VmRSS"]}
    start = time.perf_counter()
    model = load_fp8_dit(bench_config(depth), weights_path, dtype=torch.bfloat16, device="cpu",
                         attention_backend="sdpa")
    result["load_s"] = time.perf_counter() - start
    status = proc_status()
    result.update(rss_after_load=status["VmRSS"], hwm_after_load=status["VmHWM"],
                  anon_after_load=status["RssAnon"], file_after_load=status["RssFile"],
                  model_bytes=sum(t.numel() * t.element_size() for t in model.state_dict().values()))

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 4, 4, generator=gen).bfloat16()  # 1 x 2 x 2 patches -> 4 image tokens
    text_states = torch.randn(1, 8, 4096, generator=gen).bfloat16()
    text_mask = torch.ones(1, 8)
    pooled = torch.randn(1, 768, generator=gen).bfloat16()
    start = time.perf_counter()
    with torch.no_grad():
        out = model(x, torch.tensor([900.0]), text_states, text_mask, pooled, torch.tensor([6016.0]))
    result["forward_s"] = time.perf_counter() - start
    status = proc_status()
    result.update(
        hwm_after_forward=status["VmHWM"], rss_anon=status["RssAnon"], rss_file=status["RssFile"],
        output_finite=float(torch.isfinite(out).all()), output_std=float(out.float().std()),
    )
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def report_bf16(file_size: int, n_params: int, write_s: float, r: dict[str, float], depth) -> str:
    """--bf16: quantise-at-load peak against the loaded fp8 model's size and the bf16 file's."""
    model = r["model_bytes"]
    return "\n".join([
        f"model {MODEL}{f' with {depth[0]} double + {depth[1]} single blocks' if depth else ''}: "
        f"{n_params:,} parameters; bf16 checkpoint written in {write_s:.0f} s",
        f"bf16 file size                 {gib(file_size)}",
        f"loaded fp8 model (fp8 + bf16)  {gib(model)} (what the fp8 file pair would hold)",
        f"load_fp8_dit (quantise)        {r['load_s']:.1f} s; peak RSS {gib(r['hwm_after_load'])} = "
        f"{r['hwm_after_load'] / model:.3f}x the fp8 model, {r['hwm_after_load'] / file_size:.3f}x the bf16 file",
        f"after load                     RSS {gib(r['rss_after_load'])}: anon {gib(r['anon_after_load'])}, "
        f"file-backed {gib(r['file_after_load'])}",
        f"forward                        {r['forward_s']:.1f} s; peak RSS {gib(r['hwm_after_forward'])}; "
        f"output finite: {bool(r['output_finite'])}",
    ])


def report(file_size: int, n_params: int, write_s: float, r: dict[str, float]) -> str:
    ratio_load, ratio_fwd = r["hwm_after_load"] / file_size, r["hwm_after_forward"] / file_size
    return "\n".join([
        f"model {MODEL}: {n_params:,} parameters; checkpoint written in {write_s:.0f} s",
        f"file size                      {gib(file_size)} ({file_size:,} bytes)",
        f"RSS at child start             {gib(r['rss_start'])}",
        f"load_fp8_dit                   {r['load_s']:.1f} s; RSS {gib(r['rss_after_load'])}, "
        f"peak {gib(r['hwm_after_load'])} = {ratio_load:.3f}x file",
        f"forward (4 img + 8 txt tokens) {r['forward_s']:.1f} s; peak RSS {gib(r['hwm_after_forward'])} = "
        f"{ratio_fwd:.3f}x file (anon {gib(r['rss_anon'])}, file-backed {gib(r['rss_file'])} at the end)",
        f"output finite: {bool(r['output_finite'])}, std {r['output_std']:.4g}",
        f"target peak <= 1.15x file: {'met' if ratio_fwd <= 1.15 else 'NOT met'}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tmp-dir", default=tempfile.gettempdir(), help="where the ~13 GB checkpoint goes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bf16", action="store_true",
                        help="write a bf16 checkpoint instead and measure --use-fp8's quantise-at-load path")
    parser.add_argument("--depth", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"),
                        help="full width, this many blocks (default: the full 20 + 40)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    depth = tuple(args.depth) if args.depth else None
    if args.child:
        child(Path(args.child), args.threads, depth)
        return 0

    free = shutil.disk_usage(args.tmp_dir).free
    if free < MIN_FREE_BYTES:
        print(f"error: {args.tmp_dir} has {free / 1e9:.1f} GB free; the benchmark needs 30 GB "
              "(pass --tmp-dir on a larger disk)", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="hyvideo_fp8_bench_", dir=args.tmp_dir))
    try:
        start = time.perf_counter()
        weights_path, n_params = write_checkpoint(folder, bf16=args.bf16, depth=depth)
        write_s = time.perf_counter() - start
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(weights_path),
               "--threads", str(args.threads), *(["--depth", *map(str, depth)] if depth else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        measurements = json.loads(proc.stdout.strip().splitlines()[-1])
        size = weights_path.stat().st_size
        if args.bf16:
            print(report_bf16(size, n_params, write_s, measurements, depth))
        else:
            print(report(size, n_params, write_s, measurements))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
