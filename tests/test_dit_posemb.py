"""3-D RoPE: frequencies (appendix A vectors), table layout, interleaved rotation, parity with diffusers."""

from __future__ import annotations

import pytest
import torch

from hyvideo.modules.posemb_layers import apply_rotary_emb, get_rotary_pos_embed, rope_frequencies


def test_frequencies_match_the_appendix_vectors():
    torch.testing.assert_close(rope_frequencies(16, 256.0), torch.tensor([2.0**-k for k in range(8)]))
    omega = rope_frequencies(56, 256.0)
    assert omega.dtype == torch.float32 and omega.shape == (28,)
    torch.testing.assert_close(omega[:4], torch.tensor([1.0, 0.8203354, 0.6729501, 0.55204475]))
    torch.testing.assert_close(omega[-2:], torch.tensor([0.00580467, 0.00476177]))
    with pytest.raises(ValueError, match="even"):
        rope_frequencies(7, 256.0)


def test_table_layout_t_h_w_channels_and_t_major_rows():
    dims, thw = (4, 6, 6), (2, 6, 4)  # latent (T, H, W); patched grid (2, 3, 2)
    cos, sin = get_rotary_pos_embed(thw, dims, 256.0, (1, 2, 2))
    assert cos.shape == sin.shape == (2 * 3 * 2, 16) and cos.dtype == torch.float32
    for token, (t, h, w) in enumerate((t, h, w) for t in range(2) for h in range(3) for w in range(2)):
        angles = torch.cat([pos * rope_frequencies(d, 256.0) for pos, d in zip((t, h, w), dims, strict=True)])
        torch.testing.assert_close(cos[token], angles.cos().repeat_interleave(2))
        torch.testing.assert_close(sin[token], angles.sin().repeat_interleave(2))


def test_full_size_table_shape_and_divisibility_check():
    cos, _ = get_rotary_pos_embed((33, 90, 160), (16, 56, 56), 256.0, (1, 2, 2))  # 720p, 129 frames
    assert cos.shape == (118_800, 128)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        get_rotary_pos_embed((3, 9, 8), (16, 56, 56), 256.0, (1, 2, 2))


def test_rotation_is_interleaved_pairs():
    x, k = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    angles = torch.randn(3, 4)
    cos, sin = angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)
    out, _ = apply_rotary_emb(x, k, cos, sin)
    c, s = angles.cos()[None, :, None], angles.sin()[None, :, None]
    torch.testing.assert_close(out[..., 0::2], x[..., 0::2] * c - x[..., 1::2] * s)
    torch.testing.assert_close(out[..., 1::2], x[..., 1::2] * c + x[..., 0::2] * s)
    # the same as multiplying complex pairs (x[2i] + i x[2i+1]) by e^{i angle}
    as_complex = (
        torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
        * torch.polar(torch.ones_like(angles), angles)[None, :, None]
    )
    torch.testing.assert_close(out, torch.view_as_real(as_complex).flatten(-2))


def test_scores_depend_on_relative_positions_only():
    cos, sin = get_rotary_pos_embed((8, 2, 2), (16, 56, 56), 256.0, (1, 2, 2))  # one token per frame
    q, k = torch.randn(1, 1, 1, 128).expand(1, 8, 1, 128), torch.randn(1, 1, 1, 128).expand(1, 8, 1, 128)
    rq, rk = apply_rotary_emb(q, k, cos, sin)
    scores = (rq[0, :, 0] @ rk[0, :, 0].T).double()
    torch.testing.assert_close(scores[3, 1], scores[7, 5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[2, 2], scores[6, 6], rtol=1e-5, atol=1e-5)


def test_low_precision_inputs_rotate_in_float32():
    q, k = torch.randn(1, 12, 2, 16).to(torch.bfloat16), torch.randn(1, 12, 2, 16).to(torch.bfloat16)
    cos, sin = get_rotary_pos_embed((3, 4, 4), (4, 6, 6), 256.0, (1, 2, 2))
    out_q, out_k = apply_rotary_emb(q, k, cos, sin)
    ref_q, ref_k = apply_rotary_emb(q.float(), k.float(), cos, sin)
    assert out_q.dtype == torch.bfloat16
    assert torch.equal(out_q, ref_q.to(torch.bfloat16)) and torch.equal(out_k, ref_k.to(torch.bfloat16))


def test_tables_equal_diffusers():
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed

    latents = torch.zeros(1, 16, 5, 12, 20)
    cos, sin = get_rotary_pos_embed(latents.shape[2:], (16, 56, 56), 256.0, (1, 2, 2))
    d_cos, d_sin = HunyuanVideoRotaryPosEmbed(2, 1, [16, 56, 56], 256.0)(latents)
    assert torch.equal(cos, d_cos) and torch.equal(sin, d_sin)
