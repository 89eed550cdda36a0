"""scripts/benchmark.py: its FLOP arithmetic, argument checks, and CPU smoke runs beside diffusers."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark.py"
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402
import benchmark_report  # noqa: E402

TINY = ["--height", "32", "--width", "32", "--frames", "5", "--text-tokens", "8", "--steps", "1",
        "--repeats", "1", "--warmup", "0", "--threads", "1", "--device", "cpu"]


def run_script(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def markdown_table(stdout: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of the table whose header is exactly `columns` (fails if it is not printed)."""
    lines = stdout.splitlines()
    head = "| " + " | ".join(columns) + " |"
    assert head in lines, f"table header {head!r} not in output:\n{stdout}"
    rows = []
    for line in lines[lines.index(head) + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(dict(zip(columns, cells, strict=True)))
    return rows


def positive_finite(text: str) -> float:
    value = float(text)
    assert math.isfinite(value) and value > 0, text
    return value


def test_flops_match_the_published_arithmetic():
    # users_and_peers.md §4: 720x1280x129 -> 118,800 + 256 tokens; 1.618 + 10.450 = 12.07 PFLOP, 86.6%
    # of it attention.
    full = benchmark_report.dit_configs()["full"]
    t, h, w = benchmark_report.latent_shape(720, 1280, 129)
    linear, attn = benchmark_report.dit_flops(full, t * (h // 2) * (w // 2) + 256)
    assert (linear / 1e15, attn / 1e15) == pytest.approx((1.618, 10.450), abs=1e-3)
    assert attn / (linear + attn) == pytest.approx(0.866, abs=5e-4)
    # 544x960x129: 67,576 tokens, 4.29 PFLOP, 78.6% attention.
    t, h, w = benchmark_report.latent_shape(544, 960, 129)
    linear, attn = benchmark_report.dit_flops(full, t * (h // 2) * (w // 2) + 256)
    assert (linear + attn) / 1e15 == pytest.approx(4.29, abs=5e-3)
    assert attn / (linear + attn) == pytest.approx(0.786, abs=5e-4)


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--help"])
    assert exit_info.value.code == 0 and "--compare-diffusers" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--frames", "4"])  # not 4k+1
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit, match="attention backend 'nonsense'"):
        benchmark.main(["--attention", "nonsense", "--device", "cpu"])


def test_meta_built_fp8_dit_is_materialised_and_runs():
    spec = {"dit": "test-tiny", "precision": "bf16", "attention": "sdpa", "fp8": True}
    model = benchmark.build_ours_dit(spec)
    assert not any(p.is_meta for p in model.parameters())
    fp8 = [m for m in model.modules() if isinstance(m, benchmark.FP8Linear)]
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    inputs, run = benchmark.dit_work(dict(spec, height=32, width=32, frames=5, text_tokens=8, steps=2),
                                     torch.device("cpu"))
    assert inputs == {"image_tokens": 2 * 2 * 2, "text_tokens": 8}
    out = run("ours", model, 2)
    assert out.shape == (1, 16, 2, 4, 4) and torch.isfinite(out).all()


def test_cpu_smoke_dit_beside_diffusers():
    out = run_script("--dit", "test-tiny", "--vae", "none", "--text-encoder", "none", "--compare-diffusers",
                     *TINY)
    assert "command: `python scripts/benchmark.py --dit test-tiny" in out
    assert f"torch {torch.__version__}" in out and "torch threads 1" in out
    rows = markdown_table(out, benchmark.COMPONENT_COLUMNS)
    assert [(r["component"], r["impl"]) for r in rows] == [("DIT", "ours"), ("DIT", "diffusers")]
    for row in rows:
        positive_finite(row["min s"]), positive_finite(row["peak MiB"]), positive_finite(row["TFLOPS"])
    assert float(rows[1]["rel err vs diffusers"]) < 2e-2  # same weights, bf16
    (ratio,) = markdown_table(out, benchmark.RATIO_COLUMNS)
    positive_finite(ratio["DiT step time"]), positive_finite(ratio["DiT peak memory"])
    assert ratio["VAE decode time"] == "–"


@pytest.mark.slow
def test_cpu_smoke_vae_beside_diffusers_and_text_encoder():
    out = run_script("--dit", "none", "--vae", "tiny", "--text-encoder", "tiny", "--compare-diffusers", *TINY)
    rows = markdown_table(out, benchmark.COMPONENT_COLUMNS)
    assert [(r["component"], r["impl"]) for r in rows] == [("text enc", "ours"), ("VAE", "ours"),
                                                          ("VAE", "diffusers")]
    assert float(rows[2]["rel err vs diffusers"]) < 1e-5  # float32, same weights and tile geometry
    (ratio,) = markdown_table(out, benchmark.RATIO_COLUMNS)
    positive_finite(ratio["VAE decode time"]), positive_finite(ratio["VAE peak memory"])
