"""Host RAM given back by freeing the text encoders after the last prompt (`release_text_encoders`).

    .venv/bin/python scripts/benchmark_release.py [--llm-layers 8] [--offload-mode model]

Writes the tiny checkpoint tree, replaces its LLM by a wider random Llama (real vocabulary, hidden 2048, bf16
by default: about 1.3 GB), loads the sampler as the CLI does, samples one tiny video keeping the encoders and
one releasing them, and prints the process's RSS after each (VmRSS, in a fresh process per run), against
the bytes of the encoders' weights. Random weights: the figures are memory, not video quality.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from benchmark_fp8_load import proc_status  # noqa: E402  (VmRSS / VmHWM in bytes)

GiB = 2**30


def write_tree(root: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hyvideo.testing.tiny import TINY_DIT, TINY_LLAMA, write_dit, write_tiny_checkpoints

    write_tiny_checkpoints(root)
    write_dit(root / "hunyuan-video-t2v-720p" / "transformers", TINY_DIT.with_updates(text_states_dim=2048))
    config = LlamaConfig(**{**TINY_LLAMA, "hidden_size": 2048, "intermediate_size": 5632,
                            "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 8})
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "text_encoder")


def child(root: str, offload_mode: str, release: bool) -> None:
    from hyvideo.config import parse_args
    from hyvideo.inference import HunyuanVideoSampler
    from hyvideo.lowmem.release import weight_bytes

    configs = parse_args(["--model-base", root, "--video-size", "32", "32", "--video-length", "1",
                          "--infer-steps", "2", "--precision", "fp32", "--vae-precision", "fp32",
                          "--text-encoder-precision", "bf16", "--text-encoder-precision-2", "fp32",
                          "--prompt", "x", "--offload-mode", offload_mode])
    sampler = HunyuanVideoSampler.from_pretrained(configs)
    encoders = weight_bytes([sampler.text_encoder, sampler.text_encoder_2])
    loaded = proc_status()["VmRSS"]
    sampler.predict("a red ball", height=32, width=32, video_length=1, seed=5, infer_steps=2,
                    show_progress=False, release_text_encoders=release)
    print(json.dumps({"encoders": encoders, "rss_loaded": loaded, "rss_after": proc_status()["VmRSS"]}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llm-layers", type=int, default=8)
    p.add_argument("--offload-mode", default="model", choices=["none", "model", "block"])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.child[2] == "release")
        return 0
    with tempfile.TemporaryDirectory(prefix="hyvideo_release_") as tmp:
        write_tree(Path(tmp), args.llm_layers)
        print(f"offload mode {args.offload_mode}; LLM hidden 2048, {args.llm_layers} layers, bf16")
        print("| run | encoders' weights | RSS after loading | RSS after the call | change |")
        print("|---|---|---|---|---|")
        for mode in ("keep", "release"):
            cmd = [sys.executable, __file__, "--child", tmp, args.offload_mode, mode]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {mode} | {r['encoders'] / GiB:.2f} GiB | {r['rss_loaded'] / GiB:.2f} GiB | "
                  f"{r['rss_after'] / GiB:.2f} GiB | {(r['rss_after'] - r['rss_loaded']) / GiB:+.2f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
