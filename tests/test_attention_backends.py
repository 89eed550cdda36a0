"""fa3 / flash / sage backends: selection, one-line errors, varlen use (stand-in modules on CPU), GPU kernels."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch
import torch.nn.functional as F

from hyvideo.modules import attention as attention_module
from hyvideo.modules.attention import attention, attention_backend_problem, resolve_attention_backend
from tests.helpers import rel_err
from tests.test_dit_attention import fake_flash_module, key_mask_from_lengths, qkv, reference_attention

H100, A10 = ("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA A10", (8, 6))


def fake_sage_module(calls: list) -> types.SimpleNamespace:
    """Stand-in for sageattention: exact attention through SDPA, recording the dtypes it was given."""

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False):
        assert tensor_layout == "NHD" and not is_causal
        calls.append(q.dtype)
        return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)

    def sageattn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):
        calls.append(q.dtype)
        return fake_flash_module().flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)

    return types.SimpleNamespace(sageattn=sageattn, sageattn_varlen=sageattn_varlen)


@pytest.fixture
def machine(monkeypatch):
    """Set which optional packages import and which GPU is visible (nothing runs on a GPU)."""

    def set_machine(packages: dict, gpu=None):
        monkeypatch.setattr(attention_module, "_optional_modules", dict(packages))
        monkeypatch.setattr(attention_module, "_gpu", lambda: gpu)

    return set_machine


def test_auto_prefers_fa3_then_flash_then_sdpa(machine):
    both = {"flash_attn_interface": fake_flash_module(), "flash_attn": fake_flash_module()}
    machine(both, H100)
    assert resolve_attention_backend("auto") == "fa3"
    machine(both, A10)  # FA3 is Hopper-only
    assert resolve_attention_backend("auto") == "flash"
    machine({"flash_attn_interface": None, "flash_attn": fake_flash_module()}, H100)
    assert resolve_attention_backend("auto") == "flash"
    machine(both, None)  # no GPU: the kernels are CUDA-only
    assert resolve_attention_backend("auto") == "sdpa"
    machine({"flash_attn_interface": None, "flash_attn": None}, H100)
    assert resolve_attention_backend("auto") == "sdpa"


def test_unusable_backends_say_what_to_install_or_which_card(machine):
    machine({"flash_attn_interface": None, "flash_attn": None, "sageattention": None}, H100)
    assert "needs flash-attn 3 (module flash_attn_interface" in attention_backend_problem("fa3")
    assert "pip install flash-attn" in attention_backend_problem("flash")
    assert "pip install sageattention" in attention_backend_problem("sage")
    assert attention_backend_problem("sdpa") is None and attention_backend_problem("auto") is None
    assert "is unknown" in attention_backend_problem("xformers")
    machine({"flash_attn_interface": fake_flash_module(), "sageattention": fake_sage_module([])}, A10)
    assert attention_backend_problem("fa3") == (
        "needs compute capability >= 9.0 (Hopper, e.g. H100); NVIDIA A10 has 8.6 (use flash or sdpa)")
    assert attention_backend_problem("sage") is None
    machine({"flash_attn_interface": fake_flash_module()}, None)
    with pytest.raises(ValueError, match=r"'fa3' runs on NVIDIA GPUs only.*available: \['sdpa', 'vanilla'\]"):
        resolve_attention_backend("fa3")


@pytest.mark.parametrize("backend", ["fa3", "sage"])
def test_kernels_use_varlen_with_a_key_mask_and_sdpa_with_a_full_mask(machine, backend):
    calls: list = []
    module = fake_flash_module() if backend == "fa3" else fake_sage_module(calls)
    machine({"flash_attn_interface": module, "sageattention": module}, H100)
    q, k, v = qkv(length=10)
    key_mask = key_mask_from_lengths([10, 6], 10)
    out = attention(q, k, v, backend=backend, key_mask=key_mask).unflatten(-1, (2, 16))
    reference = reference_attention(q, k, v, key_mask).unflatten(-1, (2, 16))
    tol = 1e-5 if backend == "fa3" else 1e-2  # sage: the stand-in runs in bf16, as the real kernel must
    assert out.dtype == q.dtype  # float32 in, float32 out (sage computes in bf16 in between)
    assert rel_err(out[0], reference[0]) <= tol and rel_err(out[1, :6], reference[1, :6]) <= tol
    assert rel_err(attention(q, k, v, backend=backend), reference_attention(q, k, v)) <= tol
    if backend == "sage":
        assert calls == [torch.bfloat16, torch.bfloat16]


# ------------------------------------------------------------------------------------------------
# The real kernels (GPU)
# ------------------------------------------------------------------------------------------------


def _gpu_kernel(backend: str) -> None:
    package = {"fa3": "flash_attn_interface", "flash": "flash_attn", "sage": "sageattention"}[backend]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    problem = attention_backend_problem(backend)
    if problem:
        pytest.skip(problem)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fa3", "flash", "sage"])
def test_gpu_kernels_match_sdpa(backend):
    _gpu_kernel(backend)
    q, k, v = (x.cuda().bfloat16() for x in qkv(length=300, heads=4, dim=128))
    key_mask = key_mask_from_lengths([300, 200], 300).cuda()
    out = attention(q, k, v, backend=backend, key_mask=key_mask).float()
    expected = attention(q, k, v, backend="sdpa", key_mask=key_mask).float()
    tol = 2e-2 if backend != "sage" else 6e-2  # bf16 kernels; sage quantises QK^T to int8
    assert rel_err(out[0], expected[0]) <= tol and rel_err(out[1, :200], expected[1, :200]) <= tol
