"""--fp8-gemm (torch._scaled_mm in the block linears) and --use-fp8 on a bf16 checkpoint (quantised at load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sample_video
from hyvideo.modules import HYVideoDiffusionTransformer
from hyvideo.modules.fp8_gemm import (
    FP8GemmLinear,
    cpu_supports_rowwise,
    enable_fp8_gemm,
    fp8_gemm_granularity,
    quantize_activation,
)
from hyvideo.modules.fp8_optimization import FP8Linear, load_fp8_dit, quantize_state_dict
from hyvideo.testing.tiny import write_tiny_checkpoints
from hyvideo.utils.file_utils import load_latents
from tests.helpers import rel_err
from tests.test_fp8 import TINY, TINY_FP8_LAYERS, forward, inputs, load_tiny

FP8 = torch.float8_e4m3fn
SMALL = ["--video-size", "64", "96", "--video-length", "5", "--infer-steps", "2", "--precision", "fp32",
         "--vae-precision", "fp32", "--text-encoder-precision", "fp32", "--text-encoder-precision-2", "fp32"]


@pytest.fixture(scope="module")
def bf16_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    model = HYVideoDiffusionTransformer(TINY, device="meta")
    weights = {k: (torch.randn(v.shape, generator=gen) * 0.2).bfloat16() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("bf16") / "mp_rank_00_model_states.pt"
    torch.save({"module": weights}, path)
    return path, weights


@pytest.fixture(scope="module")
def fp8_file(bf16_file, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fp8")
    fp8_weights, scale_map = quantize_state_dict(bf16_file[1])
    torch.save({"module": fp8_weights}, folder / "w_fp8.pt")
    torch.save(scale_map, folder / "w_fp8_map.pt")
    return folder / "w_fp8.pt"


# ------------------------------------------------------------------------------------------------
# fp8 GEMM
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("granularity", ["rowwise", "tensor"])
def test_activation_quantisation_is_the_textbook_formula_bit_for_bit(granularity, dtype):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(257, 96, generator=gen) * torch.logspace(-4, 4, 257)[:, None]).to(dtype)
    x[3] = 0  # an all-zero row: scale 1
    x[7, 5] = x[7].abs().max() * -1  # the extreme value negative: it must land on -448 exactly
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True) if granularity == "rowwise" else x32.abs().amax()
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    expected = (x32 / scale).clamp(-448.0, 448.0).to(FP8)
    x8, x_scale = quantize_activation(x, granularity)
    assert x_scale.dtype == torch.float32 and x_scale.shape == scale.shape and torch.equal(x_scale, scale)
    assert torch.equal(x8.view(torch.uint8), expected.view(torch.uint8))
    assert x8.float().abs().max() == 448.0


@pytest.mark.parametrize("granularity", ["rowwise", "tensor"])
def test_fp8_gemm_layer_is_the_scaled_product_of_the_quantised_operands(granularity):
    layer = FP8Linear(64, 48, compute_dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_((torch.randn(48, 64) * 100).to(FP8))
        layer.bias.copy_(torch.randn(48))
    layer.fp8_scale = torch.tensor(0.0123)
    gemm = FP8GemmLinear.from_fp8_linear(layer, granularity)
    assert gemm.weight is layer.weight and gemm.fp8_scale is layer.fp8_scale  # shared, not copied
    x = torch.randn(3, 5, 64) * torch.logspace(-2, 2, 5)[None, :, None]  # rows of very different size
    with torch.no_grad():
        out = gemm(x)
    with torch.no_grad():
        x8, x_scale = quantize_activation(x.reshape(15, 64), granularity)
        weight = layer.weight.float() * 0.0123
        expected = (x8.float() * x_scale) @ weight.t() + layer.bias
        exact_small_row = x[0, 0] @ weight.t() + layer.bias
    assert out.shape == (3, 5, 48) and out.dtype == torch.float32
    assert rel_err(out.reshape(15, 48), expected) <= 1e-5  # float32 accumulation order only
    if granularity == "rowwise":  # a per-token scale keeps a row 10^4 smaller than the largest accurate
        assert rel_err(out[0, 0], exact_small_row) < 0.1


def test_fp8_gemm_dit_is_close_to_the_dequantise_path(fp8_file):
    # Tolerance 1e-1, the bound test_fp8.py reasons out for rounding the *weights* to E4M3 across the tiny
    # DiT's 26 quantised layers: here the activations entering those 26 layers are rounded to the same grid
    # (3 mantissa bits, up to 2^-4 relative per element), an error of the same kind and size. Measured 4.6e-2.
    dequant = load_tiny(fp8_file)
    gemm = load_tiny(fp8_file)
    assert enable_fp8_gemm(gemm, "cpu") == TINY_FP8_LAYERS
    assert sum(isinstance(m, FP8GemmLinear) for m in gemm.modules()) == TINY_FP8_LAYERS
    err = rel_err(forward(gemm), forward(dequant))
    assert 1e-3 < err <= 1e-1  # > 1e-3: the activations really were quantised


def test_fp8_gemm_needs_fp8_layers_and_fp8_tensor_cores(monkeypatch):
    with pytest.raises(ValueError, match="no FP8Linear layers.*--use-fp8"):
        enable_fp8_gemm(HYVideoDiffusionTransformer(TINY), "cpu")
    assert fp8_gemm_granularity("cpu") == "rowwise"
    # The capability rule, with the CUDA queries faked (no GPU here): nothing runs on a device.
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    for capability, expected in (((8, 9), "tensor"), ((9, 0), "rowwise"), ((10, 0), "rowwise")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert fp8_gemm_granularity("cuda:0") == expected
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with pytest.raises(ValueError, match=r"compute capability >= 8\.9.*RTX 3090 has 8\.6"):
        fp8_gemm_granularity("cuda:0")


def test_cpu_without_rowwise_scaled_mm_falls_back_to_per_tensor_scales(monkeypatch):
    """torch 2.11's CPU _scaled_mm asserts on row-wise scales (seen on the GPU machine's CPU reference)."""
    real = torch._scaled_mm

    def per_tensor_only(a, b, *, scale_a, scale_b, **kwargs):
        if scale_a.numel() != 1 or scale_b.numel() != 1:
            raise RuntimeError("Now _scaled_mm only supports per-tensor scaling for CPU backend.")
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kwargs)

    cpu_supports_rowwise.cache_clear()
    monkeypatch.setattr(torch, "_scaled_mm", per_tensor_only)
    try:
        assert fp8_gemm_granularity("cpu") == "tensor"
    finally:
        cpu_supports_rowwise.cache_clear()


@pytest.mark.gpu
def test_fp8_gemm_on_gpu_matches_cpu(fp8_file):
    cpu = load_tiny(fp8_file)
    enable_fp8_gemm(cpu, "cpu")
    model = load_fp8_dit(TINY, fp8_file, dtype=torch.bfloat16, device="cuda", attention_backend="sdpa")
    enable_fp8_gemm(model, "cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = model(*(t.cuda() for t in inputs()))
    assert rel_err(gpu.float().cpu(), forward(cpu)) < 5e-2  # bf16 model on GPU vs fp32 on CPU


# ------------------------------------------------------------------------------------------------
# --use-fp8 with a bf16 checkpoint
# ------------------------------------------------------------------------------------------------


def test_bf16_checkpoint_is_quantised_at_load_like_the_converted_pair(bf16_file, fp8_file):
    on_the_fly = load_tiny(bf16_file[0])
    fp8_layers = [m for m in on_the_fly.modules() if isinstance(m, FP8Linear)]
    assert len(fp8_layers) == TINY_FP8_LAYERS and all(m.weight.dtype == FP8 for m in fp8_layers)
    assert torch.equal(forward(on_the_fly), forward(load_tiny(fp8_file)))  # one rule, one result


def test_page_out_leaves_a_memory_mapped_source_readable(bf16_file):
    path, weights = bf16_file
    mapped = torch.load(path, mmap=True, weights_only=True)["module"]
    fp8_a, scales_a = quantize_state_dict(mapped, page_out=True)
    fp8_b, scales_b = quantize_state_dict(weights)
    assert all(torch.equal(mapped[k], weights[k]) for k in weights)  # pages re-read from the file
    assert all(torch.equal(fp8_a[k].view(torch.uint8) if v.dtype == FP8 else fp8_a[k],
                           v.view(torch.uint8) if v.dtype == FP8 else v) for k, v in fp8_b.items())
    assert all(torch.equal(scales_a[k], scales_b[k]) for k in scales_b)


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


def test_cli_use_fp8_on_the_bf16_tree_and_fp8_gemm(tiny_tree, tmp_path, capsys, caplog):
    latents = {}
    for name, extra in (("bf16", []), ("fp8", ["--use-fp8"]), ("gemm", ["--use-fp8", "--fp8-gemm"])):
        out = tmp_path / name
        with caplog.at_level("INFO"):
            code = sample_video.main(["--model-base", str(tiny_tree), "--prompt", "a boat", "--seed", "5",
                                      "--save-latents", "--save-path", str(out), *SMALL, *extra])
        assert code == 0, capsys.readouterr().err
        (path,) = sorted(out.glob("*.safetensors"))
        latents[name] = load_latents(path)[0]
    assert "quantising" in caplog.text and "torch._scaled_mm" in caplog.text
    # The 1e-1 of test_fp8.py's fp8-vs-bf16 model check (weight rounding), here on the sampled latents.
    assert 1e-4 < rel_err(latents["fp8"], latents["bf16"]) <= 1e-1
    assert 1e-4 < rel_err(latents["gemm"], latents["fp8"]) <= 1e-1
