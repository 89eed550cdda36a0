"""What --shard-weights saves: per-rank DiT bytes, all-gather volume, and peak host RSS while loading.

Two measurements (CPU only; no GPU is needed):

  python scripts/measure_weight_sharding.py shapes [--worlds 1 2 4 8]
      The full-size HunyuanVideo DiT (HYVideo-T/2-cfgdistill) built on the meta device and sharded by the real
      FSDP2 `fully_shard` over a fake process group of each world size (torch's testing "fake" backend: no
      memory, no communication). Prints, per rank, the resident DiT bytes (shards + unsharded buffers), the
      bytes all-gathered per forward, and the largest unit (block), for bf16 and fp8 weights.

  python scripts/measure_weight_sharding.py rss [--double 2 --single 4]
      Writes an fp8 checkpoint of a full-width DiT cut to a few blocks, then launches 2 gloo ranks twice: once
      loading it unsharded (every rank the whole model), once with --shard-weights' loader; each rank touches
      every weight it holds and reports its peak resident set (ru_maxrss). Ratios are within the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hyvideo.constants import HUNYUAN_VIDEO_CONFIG  # noqa: E402
from hyvideo.modules.fp8_optimization import convert_fp8_linear, fp8_layer_names  # noqa: E402
from hyvideo.modules.models import HYVideoDiffusionTransformer  # noqa: E402
from hyvideo.parallel.groups import SequenceParallelConfig, SequenceParallelState  # noqa: E402
from hyvideo.parallel.weight_sharding import (  # noqa: E402
    dit_blocks,
    gathered_bytes_per_forward,
    local_weight_bytes,
    shard_dit,
)

GIB = 2**30
FULL = HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"]


def meta_dit(fp8: bool) -> HYVideoDiffusionTransformer:
    model = HYVideoDiffusionTransformer(FULL, dtype=torch.bfloat16, device="meta")
    if fp8:
        convert_fp8_linear(model, {n: torch.ones(()) for n in fp8_layer_names(model)})
    return model


def shapes(worlds: list[int]) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    print("| weights | ranks | resident DiT per rank (GiB) | all-gathered per forward per rank (GiB) "
          "| largest unit gathered (GiB) |")
    print("|---|---|---|---|---|")
    for fp8 in (False, True):
        for world in worlds:
            model = meta_dit(fp8)
            largest = max(local_weight_bytes(b) for b in dit_blocks(model))
            if world > 1:
                dist.init_process_group("fake", store=FakeStore(), rank=world - 1, world_size=world)
                state = SequenceParallelState(SequenceParallelConfig(1, world), world - 1, world,
                                              torch.device("cpu"))
                shard_dit(model, state)
            resident, gathered = local_weight_bytes(model), gathered_bytes_per_forward(model)
            if world > 1:
                dist.destroy_process_group()
            print(f"| {'fp8' if fp8 else 'bf16'} | {world} | {resident / GIB:.2f} | {gathered / GIB:.2f} "
                  f"| {largest / GIB:.2f} |")


def write_cut_checkpoint(folder: Path, double: int, single: int) -> tuple[Path, dict]:
    from hyvideo.modules.fp8_optimization import fp8_map_path, quantize_state_dict
    from hyvideo.testing.tiny import randomize_

    config = FULL.with_updates(mm_double_blocks_depth=double, mm_single_blocks_depth=single)
    model = HYVideoDiffusionTransformer(config, dtype=torch.bfloat16)
    randomize_(model, generator=torch.Generator().manual_seed(0), std=0.02)
    fp8, scales = quantize_state_dict(model.state_dict())
    path = folder / "dit_fp8.pt"
    torch.save({"module": fp8}, path)
    torch.save(scales, fp8_map_path(path))
    del model, fp8
    return path, config.to_dict()


def rss_worker(path: Path, config: dict, sharded: bool) -> None:
    from hyvideo.constants import DiTConfig
    from hyvideo.modules.fp8_optimization import load_fp8_dit
    from hyvideo.parallel.layout import given_layout, init_parallel_groups

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = init_parallel_groups(given_layout(1, world), rank=rank, world_size=world)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dit_config = DiTConfig.from_dict(config)
    if sharded:
        from hyvideo.parallel.weight_sharding import load_sharded_dit

        model = load_sharded_dit(dit_config, path, groups.world, use_fp8=True, device="cpu")
    else:
        model = load_fp8_dit(dit_config, path, device="cpu")
    checksum = 0.0
    for tensor in [*model.parameters(), *model.buffers()]:  # touch every byte this rank holds
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        checksum += float(local.reshape(-1).view(torch.uint8).sum()) if local.numel() else 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {"rank": rank, "sharded": sharded, "peak_rss": peak, "before_load_rss": before,
              "held": local_weight_bytes(model), **_rss_split()}
    print("RSS " + json.dumps(report), flush=True)
    dist.destroy_process_group()


def _rss_split() -> dict:
    """Current resident memory: private (anonymous) vs file-backed pages (the mmap'd checkpoint, shared
    with every process on the host and evictable), from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def rss(double: int, single: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, config = write_cut_checkpoint(Path(tmp), double, single)
        size = path.stat().st_size
        print(f"fp8 checkpoint: full width (hidden {FULL.hidden_size}, {FULL.heads_num} heads), {double} "
              f"double + {single} single blocks, {size / GIB:.2f} GiB")
        for sharded in (False, True):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   __file__, "rss-worker", str(path), json.dumps(config)] + (["--sharded"] if sharded else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1",
                                                                            **_env()})
            lines = [json.loads(x[4:]) for x in proc.stdout.splitlines() if x.startswith("RSS ")]
            if proc.returncode or not lines:
                raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}")
            for r in sorted(lines, key=lambda r: r["rank"]):
                print(f"{'sharded  ' if sharded else 'unsharded'} rank {r['rank']}: peak RSS "
                      f"{r['peak_rss'] / GIB:.2f} GiB (before loading {r['before_load_rss'] / GIB:.2f}), "
                      f"DiT bytes held {r['held'] / GIB:.2f} GiB; after loading: private "
                      f"{r['RssAnon'] / GIB:.2f} GiB, file-backed {r['RssFile'] / GIB:.2f} GiB")


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p_shapes = sub.add_parser("shapes")
    p_shapes.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    p_rss = sub.add_parser("rss")
    p_rss.add_argument("--double", type=int, default=2)
    p_rss.add_argument("--single", type=int, default=4)
    p_worker = sub.add_parser("rss-worker")
    p_worker.add_argument("path", type=Path)
    p_worker.add_argument("config", type=json.loads)
    p_worker.add_argument("--sharded", action="store_true")
    args = parser.parse_args()
    if args.what == "shapes":
        shapes(args.worlds)
    elif args.what == "rss":
        rss(args.double, args.single)
    else:
        rss_worker(args.path, args.config, args.sharded)


if __name__ == "__main__":
    main()
