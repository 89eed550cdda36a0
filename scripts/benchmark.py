"""Speed and memory of hyvideo inference (DiT step, text encoding, VAE decode), optionally beside diffusers.

Every model is built with random weights (no download): the full-size DiT (HYVideo-T/2-cfgdistill, 12.8B
parameters) is built on the meta device and materialised layer by layer straight into its storage dtype
(bf16, or fp8 for the block linears), so it never exists in float32. Each component runs in fresh
subprocesses:
  * memory: one child per implementation builds only its model, then runs once; peak = VmHWM (CPU; the
    high-water mark is reset after building) or max_memory_allocated (accelerator), minus the memory in use
    after the imports;
  * time: one child runs ours (and diffusers, with --compare-diffusers) on the same inputs, interleaved
    (the order alternates every repeat), after --warmup untimed runs; it reports min, median and max.
Without --compare-diffusers one child does both. The DiT is timed over --steps Euler steps per run
(one forward per step: the model is guidance-distilled) and reported per step, with the fraction of the
device's peak bf16 throughput reached by the FLOP formula of users_and_peers.md §4.

    .venv/bin/python scripts/benchmark.py --dit dit-bench --vae tiny --height 256 --width 256 --frames 17 \\
        --precision fp32 --compare-diffusers --repeats 5 --threads 1
    .venv/bin/python scripts/benchmark.py --dit full --fp8 --height 32 --width 32 --frames 1 \\
        --vae none --text-encoder none --text-tokens 8 --warmup 0 --repeats 1     # ~2 min per forward on CPU
    python scripts/benchmark.py --dit full --vae none --text-encoder none --height 720 --width 1280 \\
        --frames 129 --steps 1 --repeats 2 --compare-diffusers                  # an 80 GB GPU

More cases, and the measured tables: docs/benchmarks.md.

Output: the command line, environment, and Markdown tables (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import torch  # noqa: E402
from benchmark_fp8_load import proc_status  # noqa: E402  (VmRSS / VmHWM in bytes)
from benchmark_offload import synchronize  # noqa: E402
from benchmark_report import (  # noqa: E402
    COMPONENT_COLUMNS,
    DIFFUSERS_ATTENTION,
    LEGEND,
    RATIO_COLUMNS,
    component_rows,
    dit_configs,
    header,
    latent_shape,
    markdown,
    measure_matmul_tflops,
    merge,
    ratio_row,
    table_peak,
    text_encoder_configs,
)
from benchmark_vae import _build as build_vae  # noqa: E402  (_build: official tile geometry)
from benchmark_vae import _reset_peak_rss  # noqa: E402
from torch import nn  # noqa: E402

from hyvideo.constants import PRECISION_TO_TYPE  # noqa: E402
from hyvideo.diffusion.schedulers.scheduling_flow_match_discrete import euler_step, flow_sigmas  # noqa: E402
from hyvideo.lowmem.release import trim_host_heap  # noqa: E402
from hyvideo.modules import resolve_attention_backend  # noqa: E402
from hyvideo.modules.fp8_optimization import (  # noqa: E402
    FP8_DTYPE,
    FP8Linear,
    convert_fp8_linear,
    dequantize_weight,
    fp8_layer_names,
    quantize_weight,
)

MiB = 2**20
PROMPT = "A cat walks on the grass, realistic style."
POOL_STD = 112.0  # fp8 weights ~ N(0, 112^2) clamped at 448, scale std / 112 (as benchmark_fp8_load)
# name -> (block_out_channels, GroupNorm groups); layers_per_block 2, 16 latent channels as released.
VAE_CONFIGS = {"tiny": ((8, 16, 32, 32), 8), "small": ((32, 64, 128, 128), 32),
               "full": ((128, 256, 512, 512), 32)}


# ---- Random weights at memcpy speed ------------------------------------------------------------


class RandomFill:
    """Fills tensors with slices of a Gaussian pool taken at random offsets (12.8B values in seconds)."""

    def __init__(self, seed: int = 0, pool_size: int = 1 << 22) -> None:
        self.normal = torch.randn(pool_size, generator=torch.Generator().manual_seed(seed))
        self.rng = random.Random(seed)
        self.pools: dict[tuple[torch.dtype, float], torch.Tensor] = {}

    def _pool(self, dtype: torch.dtype, std: float) -> torch.Tensor:
        if (dtype, std) not in self.pools:
            if dtype == FP8_DTYPE:
                values = quantize_weight(self.normal, torch.tensor(1.0 / POOL_STD))
            else:
                values = (self.normal * std).to(dtype)
            self.pools[dtype, std] = values.view(torch.uint8).view(-1, dtype.itemsize)
        return self.pools[dtype, std]

    def fill_(self, tensor: torch.Tensor, std: float) -> torch.Tensor:
        pool = self._pool(tensor.dtype, std)
        flat, done = tensor.view(-1).view(torch.uint8).view(-1, tensor.dtype.itemsize), 0
        while done < flat.shape[0]:
            start = self.rng.randrange(pool.shape[0] // 2)
            count = min(flat.shape[0] - done, pool.shape[0] - start)
            flat[done : done + count].copy_(pool[start : start + count])
            done += count
        return tensor


def fill_parameters_(model: nn.Module, fill: RandomFill, std: float) -> None:
    """Give every parameter random values, materialising meta ones on the CPU; norm weights are ones."""
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            data = torch.empty(param.shape, dtype=param.dtype) if param.is_meta else param.data
            if param.ndim == 1 and name == "weight" and "norm" in f"{module_name}.{name}".lower():
                data.fill_(1.0)
            else:
                fill.fill_(data, std)
            module._parameters[name] = nn.Parameter(data, requires_grad=False)


# ---- Models and one unit of work per component -------------------------------------------------


def build_ours_dit(spec: dict) -> nn.Module:
    from hyvideo.modules import HYVideoDiffusionTransformer

    config, dtype = dit_configs()[spec["dit"]], PRECISION_TO_TYPE[spec["precision"]]
    model = HYVideoDiffusionTransformer(config, dtype=dtype, device="meta",
                                        attention_backend=spec["attention"])
    std = min(0.05, config.hidden_size**-0.5)
    if spec["fp8"]:
        jitter = random.Random(1)
        scales = {n: torch.tensor(std / POOL_STD * jitter.uniform(0.5, 2.0)) for n in fp8_layer_names(model)}
        convert_fp8_linear(model, scales, compute_dtype=dtype, device="cpu")
    fill_parameters_(model, RandomFill(0), std)
    if spec.get("fp8_gemm"):
        from hyvideo.modules.fp8_gemm import enable_fp8_gemm

        enable_fp8_gemm(model, spec["device"])
    return model.eval()


def diffusers_dit_from(ours: nn.Module, spec: dict) -> nn.Module:
    """diffusers' HunyuanVideoTransformer3DModel with our weights (fp8: its layerwise fp8 storage)."""
    from diffusers.hooks import apply_layerwise_casting

    from hyvideo.testing.peers import diffusers_transformer

    c, dtype = ours.config, PRECISION_TO_TYPE[spec["precision"]]
    state = ours.state_dict()
    for name, module in ours.named_modules():
        if isinstance(module, FP8Linear):
            state[f"{name}.weight"] = dequantize_weight(module.weight, module.fp8_scale, dtype)
    theirs = diffusers_transformer(c, state)
    del state
    theirs = theirs.to(dtype).eval().requires_grad_(False)
    if spec["fp8"]:  # fp8 storage for the block linears only, like ours (modulations included)
        outside = r"^(x_embedder|context_embedder|time_text_embed|rope|norm_out|proj_out)$"
        apply_layerwise_casting(theirs, storage_dtype=FP8_DTYPE, compute_dtype=dtype,
                                skip_modules_pattern=(outside,))
    backend = DIFFUSERS_ATTENTION.get(ours.attention_backend)
    if backend is None:
        raise ValueError(f"no diffusers equivalent of attention backend {ours.attention_backend!r}")
    if backend != "native":
        theirs.set_attention_backend(backend)
    return theirs


def place_dit(model: nn.Module, impl: str, spec: dict, device: torch.device) -> Callable[[bool], None]:
    """Apply the offload mode; returns `activate(on)` that makes the model resident for a run (or not)."""
    mode = spec["offload"]
    if mode != "none" and impl == "ours":
        try:
            from hyvideo.lowmem.offload import enable_block_offload, enable_sequential_offload
        except ImportError as err:
            raise SystemExit(f"offload mode {mode!r} skipped: hyvideo.lowmem.offload is not ready ({err})") from err
        pin = device.type != "cpu"
        if mode == "block":
            enable_block_offload(model, onload_device=device, prefetch=1, pin_memory=pin)
        else:
            enable_sequential_offload(model, onload_device=device, pin_memory=pin)
        return lambda on: None
    if mode != "none" and device.type != "cpu":  # diffusers' closest equivalents
        kind = "block_level" if mode == "block" else "leaf_level"
        model.enable_group_offload(onload_device=device, offload_type=kind, num_blocks_per_group=1,
                                   use_stream=mode == "block")
        return lambda on: None
    return residency(model, device)


def residency(model: nn.Module, device: torch.device) -> Callable[[bool], None]:
    """`activate(on)`: models take turns on an accelerator (only one resident at a time); no-op on the CPU."""

    def activate(on: bool) -> None:
        if device.type != "cpu":
            model.to(device if on else "cpu")
            if not on:
                torch.accelerator.empty_cache()
    return activate


def dit_work(spec: dict, device: torch.device) -> tuple[dict, Callable[[str, nn.Module, int], torch.Tensor]]:
    """DiT inputs, and `run(impl, model, steps)`: `steps` Euler steps from the same noise."""
    config, dtype = dit_configs()[spec["dit"]], PRECISION_TO_TYPE[spec["precision"]]
    t, h, w = latent_shape(spec["height"], spec["width"], spec["frames"])
    gen = torch.Generator().manual_seed(1)
    n_txt = spec["text_tokens"]
    inputs = {
        "x": torch.randn(1, config.in_channels, t, h, w, generator=gen),
        "text": torch.randn(1, n_txt, config.text_states_dim, generator=gen).to(dtype),
        "mask": torch.ones(1, n_txt, dtype=torch.int64),
        "pooled": torch.randn(1, config.text_states_dim_2, generator=gen).to(dtype),
        "guidance": torch.tensor([6016.0]) if config.guidance_embed else None,  # 6.0 * 1000 rounded in bf16
    }
    inputs = {k: v if v is None else v.to(device) for k, v in inputs.items()}
    sigmas = flow_sigmas(max(spec["steps"], 1), shift=7.0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run(impl: str, model: nn.Module, steps: int) -> torch.Tensor:
        x = inputs["x"]
        with torch.inference_mode():
            for i in range(steps):
                ts = (sigmas[i] * 1000).reshape(1).to(device)
                args = (x.to(dtype), ts, inputs["text"], inputs["mask"], inputs["pooled"], inputs["guidance"])
                if impl == "ours":  # as our pipeline runs it: under autocast
                    with autocast:
                        v = model(*args)
                else:  # as diffusers runs it: plain weights dtype
                    v = model(*args, return_dict=False)[0]
                x = euler_step(x, v, sigma=sigmas[i], sigma_next=sigmas[i + 1])
        return x

    n_img = t * (h // config.patch_size[1]) * (w // config.patch_size[2])
    return {"image_tokens": n_img, "text_tokens": n_txt}, run


def build_component(spec: dict, impl: str, device: torch.device, cache: dict) -> tuple[nn.Module, Callable]:
    """(model, activate) for one implementation; `cache` lets diffusers reuse our weights."""
    kind = spec["component"]
    if kind == "dit":
        if impl == "ours" or "ours" not in cache:
            cache["ours"] = build_ours_dit(spec)
        model = cache["ours"] if impl == "ours" else diffusers_dit_from(cache["ours"], spec)
        if impl != "ours" and "ours" not in spec["impls"]:
            del cache["ours"]
        activate = place_dit(model, impl, spec, device)
        if impl == "ours" and spec.get("compile"):  # after offload: its hooks stay outside the graphs
            from hyvideo.modules.compile import compile_dit_blocks

            compile_dit_blocks(model, mode=spec["compile_mode"])
        return model, activate
    if kind == "vae":
        channels, groups = VAE_CONFIGS[spec["vae"]]
        model = build_vae(impl, channels, groups, spec["vae_tiling"])
        model = model.to(PRECISION_TO_TYPE[spec["vae_precision"]])
        return model, residency(model, device)
    model = build_text_encoders(spec)
    return model, residency(model, device)


def vae_work(spec: dict, device: torch.device) -> Callable[[str, nn.Module, int], torch.Tensor]:
    dtype = PRECISION_TO_TYPE[spec["vae_precision"]]
    t, h, w = latent_shape(spec["height"], spec["width"], spec["frames"])
    z = torch.randn(1, 16, t, h, w, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)

    def run(impl: str, model: nn.Module, _: int) -> torch.Tensor:
        with torch.inference_mode():
            if impl == "ours":  # the pipeline's decode_latents: weights in dtype, autocast when low precision
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    return model.decode(z)
            return model.decode(z).sample
    return run


def build_text_encoders(spec: dict) -> nn.Module:
    """TextEncoder (Llama) + CLIPTextEncoder with random weights and the real tokenizers, in a ModuleDict."""
    from transformers import (
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        LlamaConfig,
        LlamaModel,
    )
    from transformers.initialization import no_init_weights

    from hyvideo.testing.tokenizers import write_clip_tokenizer, write_llama3_tokenizer
    from hyvideo.text_encoder import CLIPTextEncoder, TextEncoder

    llama_kw, clip_kw = text_encoder_configs(spec["text_encoder"])
    dtype, fill = PRECISION_TO_TYPE[spec["text_precision"]], RandomFill(3)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters allocated in their final dtype, left uninitialised ...
    try:
        with no_init_weights():
            llama, clip = LlamaModel(LlamaConfig(**llama_kw)), CLIPTextModel(CLIPTextConfig(**clip_kw))
    finally:
        torch.set_default_dtype(previous)
    for model in (llama, clip):  # ... then filled
        fill_parameters_(model, fill, 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        llama_dir = write_llama3_tokenizer(Path(tmp) / "l")
        llama_tok = AutoTokenizer.from_pretrained(llama_dir, padding_side="right")
        clip_tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "c"))
    return nn.ModuleDict({"llm": TextEncoder(llama.eval(), llama_tok),
                          "clip": CLIPTextEncoder(clip.eval(), clip_tok)})


def text_work(spec: dict, device: torch.device) -> Callable[[str, nn.Module, int], torch.Tensor]:
    def run(impl: str, model: nn.Module, _: int) -> torch.Tensor:
        states = model["llm"].encode([PROMPT], device=device).hidden_state
        model["clip"].encode([PROMPT], device=device)
        return states
    return run


# ---- Child process: build, measure, print one JSON line ----------------------------------------


def memory_in_use(device: torch.device) -> int:
    return proc_status()["VmRSS"] if device.type == "cpu" else torch.accelerator.memory_allocated(device)


def reset_peak(device: torch.device) -> bool:
    if device.type == "cpu":
        return _reset_peak_rss()  # VmHWM := current RSS
    torch.accelerator.reset_peak_memory_stats(device)
    return True


def peak_memory(device: torch.device) -> int:
    return proc_status()["VmHWM"] if device.type == "cpu" else torch.accelerator.max_memory_allocated(device)


def timed_run(run: Callable, impl: str, model: nn.Module, activate: Callable, steps: int,
              device: torch.device) -> tuple[float, torch.Tensor]:
    activate(True)
    synchronize(device)
    start = time.perf_counter()
    out = run(impl, model, steps)
    synchronize(device)
    seconds = time.perf_counter() - start
    activate(False)
    return seconds, out


def preimport(spec: dict) -> None:
    """Import the libraries a child's models need before its memory baseline is taken (not counted)."""
    if "diffusers" in spec["impls"]:
        from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel  # noqa: F401
        from diffusers.hooks import apply_layerwise_casting  # noqa: F401
    if spec["component"] == "text":
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, LlamaModel  # noqa: F401

        import hyvideo.text_encoder  # noqa: F401


def run_child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    device, kind = torch.device(spec["device"]), spec["component"]
    result: dict = {"impls": {impl: {"times": []} for impl in spec["impls"]}}
    if kind == "dit":
        result["tokens"], run = dit_work(spec, device)
    else:
        run = (vae_work if kind == "vae" else text_work)(spec, device)
    steps = spec["steps"] if kind == "dit" else 1
    preimport(spec)
    base = memory_in_use(device)
    cache: dict = {}
    models = {impl: build_component(spec, impl, device, cache) for impl in spec["impls"]}
    cache.clear()
    trim_host_heap()
    for impl, (model, _) in models.items():
        result["impls"][impl]["params"] = sum(p.numel() for p in model.parameters())
    outputs, warmup = {}, spec["warmup"]
    if spec["mode"] in ("memory", "both"):  # one implementation only: the peak is its own
        impl, (model, activate) = next(iter(models.items()))
        reset_ok = reset_peak(device)
        activate(True)
        resident = memory_in_use(device) - base
        seconds, outputs[impl] = timed_run(run, impl, model, activate, steps, device)
        entry = result["impls"][impl]
        peak = peak_memory(device) - base
        entry.update(resident_mib=resident / MiB, peak_mib=peak / MiB, peak_reset=reset_ok)
        if warmup == 0:
            entry["times"].append(seconds / steps)
        warmup = max(warmup - 1, 0)
    if spec["mode"] in ("time", "both"):
        for impl, (model, activate) in models.items():
            for _ in range(warmup):
                timed_run(run, impl, model, activate, 1, device)
        order = list(models)
        for i in range(spec["repeats"] - len(result["impls"][order[0]]["times"])):
            for impl in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
                seconds, outputs[impl] = timed_run(run, impl, *models[impl], steps, device)
                result["impls"][impl]["times"].append(seconds / steps)
        if kind == "dit" and spec["measure_peak"]:
            result["measured_peak_tflops"] = measure_matmul_tflops(device)
    for impl, out in outputs.items():
        result["impls"][impl]["finite"] = bool(torch.isfinite(out).all())
    if {"ours", "diffusers"} <= set(outputs):
        ours, theirs = outputs["ours"].double().cpu(), outputs["diffusers"].double().cpu()
        result["rel_err"] = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))
    return result


# ---- Parent: plan the children, check they fit, report -----------------------------------------


def plan_jobs(args: argparse.Namespace, spec: dict) -> list[dict]:
    jobs = []
    for kind, name in (("dit", args.dit), ("text", args.text_encoder), ("vae", args.vae)):
        if name == "none":
            continue
        job = dict(spec, component=kind)
        if args.compare_diffusers and kind != "text":
            jobs += [dict(job, impls=["ours"], mode="memory"), dict(job, impls=["diffusers"], mode="memory"),
                     dict(job, impls=["ours", "diffusers"], mode="time")]
        else:
            jobs.append(dict(job, impls=["ours"], mode="both"))
    return jobs


def run_job(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        died = f" (killed by signal {-proc.returncode}: out of memory?)" if proc.returncode < 0 else ""
        raise SystemExit(f"{spec['component']} {spec['impls']} {spec['mode']} child failed{died}:\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dit_weight_bytes(args: argparse.Namespace) -> int:
    from hyvideo.modules import HYVideoDiffusionTransformer

    dtype = PRECISION_TO_TYPE[args.precision]
    model = HYVideoDiffusionTransformer(dit_configs()[args.dit], dtype=dtype, device="meta")
    fp8 = {f"{n}.weight" for n in fp8_layer_names(model)} if args.fp8 else set()
    return sum(p.numel() * (1 if n in fp8 else p.element_size()) for n, p in model.named_parameters())


def check_fits(args: argparse.Namespace, device: torch.device) -> None:
    """Refuse CPU runs whose DiT weights cannot fit in the available RAM (the kernel would kill the child)."""
    if args.dit == "none" or device.type != "cpu":
        return
    copies = 2 if args.compare_diffusers else 1
    need = dit_weight_bytes(args) * copies
    available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    if need > 0.9 * available:
        hint = " without --compare-diffusers" if copies == 2 else " with --fp8"
        raise SystemExit(f"DiT {args.dit!r} in {args.precision}{' + fp8' if args.fp8 else ''} needs "
                         f"{need / 2**30:.1f} GiB of weights ({copies} model(s) in the timing process) "
                         f"but only {available / 2**30:.1f} GiB of RAM is available: run it{hint}, "
                         "or on a GPU")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit", default="dit-bench", choices=[*dit_configs(), "none"], help="full = 12.8B")
    p.add_argument("--vae", default="tiny", choices=[*VAE_CONFIGS, "none"], help="block_out_channels preset")
    p.add_argument("--text-encoder", default="tiny", choices=["tiny", "full", "none"],
                   help="full = Llama-3-8B (16 GB in bf16) + CLIP-L")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=1, help="DiT steps per timed run (time is reported per step)")
    p.add_argument("--text-tokens", type=int, default=256, help="text tokens fed to the DiT (all valid)")
    p.add_argument("--precision", choices=list(PRECISION_TO_TYPE), default="bf16", help="DiT dtype")
    p.add_argument("--vae-precision", choices=list(PRECISION_TO_TYPE), default=None,
                   help="default fp16 on an accelerator (official), fp32 on the CPU")
    p.add_argument("--text-precision", choices=list(PRECISION_TO_TYPE), default=None,
                   help="default fp16 on an accelerator (official), bf16 on the CPU")
    p.add_argument("--attention", "--attn-backend", dest="attention", default="auto",
                   help="ours: auto, fa3, flash, sage, sdpa, vanilla")
    p.add_argument("--fp8", action="store_true", help="fp8 storage of the 320 block linears (weight-only)")
    p.add_argument("--fp8-gemm", action="store_true", help="with --fp8: fp8 matmuls (torch._scaled_mm)")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile the DiT blocks (the warm-up "
                   "runs compile: keep --warmup >= 1; scripts/benchmark_speed.py times compiled vs eager)")
    p.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"])
    p.add_argument("--offload", choices=["none", "block", "sequential"], default="none", help="DiT offload")
    p.add_argument("--no-vae-tiling", dest="vae_tiling", action="store_false")
    p.add_argument("--compare-diffusers", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (a DiT warm-up is one step)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default=None, help="default: the accelerator if any, else cpu")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak (bf16 dense TFLOPS) for the '%% of peak' column")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.steps < 1 or args.text_tokens < 1:
        p.error("--repeats, --steps and --text-tokens must be >= 1 and --warmup >= 0")
    if args.fp8_gemm and not args.fp8:
        p.error("--fp8-gemm multiplies fp8 weights: add --fp8")
    try:
        latent_shape(args.height, args.width, args.frames)
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    device = torch.device(args.device) if args.device else (accel or torch.device("cpu"))
    on_cpu = device.type == "cpu"
    args.vae_precision = args.vae_precision or ("fp32" if on_cpu else "fp16")
    args.text_precision = args.text_precision or ("bf16" if on_cpu else "fp16")
    try:
        args.attention = resolve_attention_backend(args.attention)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    check_fits(args, device)
    peak = (args.peak_tflops, "from --peak-tflops") if args.peak_tflops else None
    if peak is None and not on_cpu and device.type == "cuda":
        peak = table_peak(torch.cuda.get_device_name(device))
    keys = ("dit", "vae", "text_encoder", "height", "width", "frames", "steps", "text_tokens", "precision",
            "vae_precision", "text_precision", "attention", "fp8", "offload", "vae_tiling", "repeats",
            "warmup", "threads", "fp8_gemm", "compile", "compile_mode")
    spec = {k: getattr(args, k) for k in keys}
    spec.update(device=str(device), measure_peak=peak is None)
    load_start = os.getloadavg()[0]
    merged = merge([(job, run_job(job)) for job in plan_jobs(args, spec)])
    if peak is None and "measured_peak_tflops" in merged.get("dit", {}):
        what = "CPU" if on_cpu else device.type
        peak = (merged["dit"]["measured_peak_tflops"], f"{what}: measured in-process (best 2048³ bf16 "
                f"matmul, {args.threads} threads), not a vendor figure")
    print("\n".join(header(args, merged, device, peak, (load_start, os.getloadavg()[0]))))
    print()
    print(markdown(COMPONENT_COLUMNS, component_rows(args, merged, peak[0] if peak else None)))
    ratio = ratio_row(merged)
    if ratio:
        print()
        print(markdown(RATIO_COLUMNS, [ratio]))
        if args.offload != "none" and on_cpu:
            print("\nnote: on the CPU diffusers runs resident (its group offload needs an accelerator).")
    print(f"\n{LEGEND}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
