"""The attention entry point, its backends, the flash varlen segmentation and the refiner mask."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from hyvideo.modules import (
    HYVideoDiffusionTransformer,
    available_attention_backends,
    register_attention_backend,
    resolve_attention_backend,
)
from hyvideo.modules import attention as attention_module
from hyvideo.modules.attention import attention, cu_seqlens_from_key_mask
from hyvideo.modules.token_refiner import refiner_attention_mask
from tests.helpers import TINY_DIT_TEST, rel_err

TINY = TINY_DIT_TEST
FLASH_HERE = "flash" in available_attention_backends()


def reference_attention(q, k, v, mask=None):
    """float64 softmax attention on (B, L, H, D) -> (B, L, H*D)."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def key_mask_from_lengths(lengths, length):
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


def qkv(batch=2, length=10, heads=2, dim=16):
    return [torch.randn(batch, length, heads, dim) for _ in range(3)]


@pytest.mark.parametrize("backend", ["sdpa", "vanilla"])
@pytest.mark.parametrize("mask_kind", ["none", "key", "full"])
def test_cpu_backends_match_the_reference(backend, mask_kind):
    q, k, v = qkv()
    mask = {
        "none": None,
        "key": key_mask_from_lengths([10, 6], 10),
        "full": refiner_attention_mask(torch.tensor([[1] * 10, [1] * 4 + [0] * 6])),
    }[mask_kind]
    out = attention(q, k, v, backend=backend, key_mask=mask)
    assert out.shape == (2, 10, 32) and out.dtype == q.dtype
    assert rel_err(out, reference_attention(q, k, v, mask)) <= 1e-5


def test_vanilla_computes_in_float32_under_autocast():
    q, k, v = (x.to(torch.bfloat16) for x in qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, backend="vanilla")
    expected = reference_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), expected) <= 4e-3  # one bf16 rounding of the result, nothing more


def test_unavailable_or_unknown_backends_raise_naming_the_available_ones():
    if not FLASH_HERE:
        with pytest.raises(ValueError, match=r"'flash'.*available: \['sdpa', 'vanilla'\]"):
            resolve_attention_backend("flash")
        assert resolve_attention_backend("auto") == "sdpa"
        with pytest.raises(ValueError, match="available"):
            HYVideoDiffusionTransformer(TINY, device="meta", attention_backend="flash")
    with pytest.raises(ValueError, match=r"'xformers' is unknown.*available"):
        resolve_attention_backend("xformers")
    with pytest.raises(ValueError, match="unknown"):
        attention(*qkv(), backend="xformers")


def test_cu_seqlens_follow_the_original_formula():
    lengths, img_len, txt_len = [5, 0, 3], 7, 5
    key_mask = key_mask_from_lengths([img_len + n for n in lengths], img_len + txt_len)
    cu = cu_seqlens_from_key_mask(key_mask)
    expected = [0]
    for i, n in enumerate(lengths):  # the original's get_cu_seqlens
        expected += [i * (img_len + txt_len) + img_len + n, (i + 1) * (img_len + txt_len)]
    assert cu.dtype == torch.int32 and cu.tolist() == expected


def fake_flash_module():
    """CPU stand-in for flash-attn: varlen = independent SDPA per cu_seqlens segment."""

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        out = torch.empty_like(q)
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            if end > start:
                seg = [x[start:end].transpose(0, 1)[None] for x in (q, k, v)]
                out[start:end] = F.scaled_dot_product_attention(*seg)[0].transpose(0, 1)
        return out

    def dense(q, k, v):
        return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2), None

    return types.SimpleNamespace(flash_attn_varlen_func=varlen, flash_attn_func=dense)


def test_flash_backend_segments_valid_and_padded_tokens(monkeypatch):
    monkeypatch.setitem(attention_module._optional_modules, "flash_attn", fake_flash_module())
    q, k, v = qkv(length=10)
    key_mask = key_mask_from_lengths([10, 6], 10)
    out = attention(q, k, v, backend="flash", key_mask=key_mask).unflatten(-1, (2, 16))
    reference = reference_attention(q, k, v, key_mask).unflatten(-1, (2, 16))
    # valid queries: identical to the key-masked result; padded queries attend only to padding
    assert rel_err(out[1, :6], reference[1, :6]) <= 1e-5 and rel_err(out[0], reference[0]) <= 1e-5
    padded = reference_attention(q[1:, 6:], k[1:, 6:], v[1:, 6:]).unflatten(-1, (2, 16))
    assert rel_err(out[1, 6:], padded[0]) <= 1e-5
    assert rel_err(attention(q, k, v, backend="flash").flatten(2), reference_attention(q, k, v)) <= 1e-5
    full = refiner_attention_mask(torch.tensor([[1] * 10, [1] * 4 + [0] * 6]))  # -> SDPA, as the original
    assert (
        rel_err(attention(q, k, v, backend="flash", key_mask=full), reference_attention(q, k, v, full))
        <= 1e-5
    )


def test_refiner_mask_is_outer_and_with_key_zero_forced():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    full = refiner_attention_mask(mask)
    assert full.shape == (2, 1, 4, 4) and full.dtype == torch.bool
    for b in range(2):
        for i in range(4):
            for j in range(4):
                assert full[b, 0, i, j] == (j == 0 or bool(mask[b, i] and mask[b, j]))
    q, k, v = qkv(length=4)
    assert torch.isfinite(attention(q, k, v, backend="sdpa", key_mask=full)).all()


def tiny_model(backend):
    model = HYVideoDiffusionTransformer(TINY, attention_backend=backend).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def tiny_inputs():
    mask = torch.ones(2, 12)
    mask[1, 7:] = 0
    return (
        torch.randn(2, 4, 3, 8, 8),
        torch.tensor([500.0, 20.0]),
        torch.randn(2, 12, 32),
        mask,
        torch.randn(2, 16),
        torch.tensor([6016.0, 6016.0]),
    )


def test_model_backends_agree_and_registered_backends_are_used(monkeypatch):
    model = tiny_model("sdpa")
    inputs = tiny_inputs()
    with torch.no_grad():
        reference = model(*inputs)
        model.set_attention_backend("vanilla")
        assert rel_err(model(*inputs), reference) <= 1e-5

        calls = []

        def counting(q, k, v, key_mask):
            calls.append(None if key_mask is None else tuple(key_mask.shape))
            return attention_module._sdpa_attention(q, k, v, key_mask)

        monkeypatch.setattr(attention_module, "_BACKENDS", dict(attention_module._BACKENDS))
        monkeypatch.setattr(attention_module, "_AVAILABLE", dict(attention_module._AVAILABLE))
        register_attention_backend("counting", counting)
        model.set_attention_backend("counting")
        assert rel_err(model(*inputs), reference) <= 1e-6
    # 1 refiner block (full mask) + 2 double + 2 single blocks (key mask over 48 image + 12 text tokens)
    assert calls == [(2, 1, 12, 12)] + [(2, 1, 1, 60)] * 4
    with pytest.raises(ValueError, match="reserved"):
        register_attention_backend("auto", counting)
