"""HYVideoDiffusionTransformer: checkpoint contract, diffusers parity, text padding, precision islands."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from hyvideo.constants import HUNYUAN_VIDEO_CONFIG, DiTConfig
from hyvideo.modules import HIGH_PRECISION_MODULES, HYVideoDiffusionTransformer
from hyvideo.modules.embed_layers import TimestepEmbedder, timestep_embedding
from hyvideo.modules.models import is_high_precision_module, unpatchify
from hyvideo.modules.modulate_layers import modulate
from hyvideo.modules.norm_layers import FP32LayerNorm, RMSNorm
from hyvideo.testing.peers import diffusers_transformer
from tests.helpers import TINY_DIT_TEST, rel_err

# A copy of shared/reference/official_dit_state_dict_keys.tsv: every official key and shape.
TSV = Path(__file__).resolve().parent / "data" / "official_dit_state_dict_keys.tsv"

TINY = TINY_DIT_TEST.with_updates(refiner_depth=2)


def tiny_model(config: DiTConfig = TINY, backend: str = "sdpa") -> HYVideoDiffusionTransformer:
    """A tiny DiT with every parameter random (the default init would zero nothing, but be explicit)."""
    model = HYVideoDiffusionTransformer(config, attention_backend=backend).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def tiny_inputs(batch: int = 2, text_len: int = 12, valid: tuple[int, ...] = (12, 7)) -> dict:
    mask = torch.zeros(batch, text_len)
    for i, n in enumerate(valid[:batch]):
        mask[i, :n] = 1
    return {
        "x": torch.randn(batch, 4, 3, 8, 8),
        "t": torch.tensor([500.0, 20.0, 999.0][:batch]),
        "text_states": torch.randn(batch, text_len, 32),
        "text_mask": mask,
        "text_states_2": torch.randn(batch, 16),
        "guidance": torch.tensor([6016.0, 3504.0, 1000.0][:batch]),
    }


def run(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw)


# ------------------------------------------------------------------------------------------------
# Checkpoint contract (full size, meta device)
# ------------------------------------------------------------------------------------------------


def test_full_size_state_dict_equals_the_official_manifest():
    model = HYVideoDiffusionTransformer(HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"], device="meta")
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    rows = [line.split("\t") for line in TSV.read_text().splitlines() if line.strip()]
    official = [(k, [int(n) for n in shape.strip("[]").split(",")]) for k, shape in rows]
    assert len(official) == 856
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == 12_821_012_544


def test_t2_has_no_guidance_in():
    model = HYVideoDiffusionTransformer(HUNYUAN_VIDEO_CONFIG["HYVideo-T/2"], device="meta")
    keys = model.state_dict().keys()
    assert not any(k.startswith("guidance_in") for k in keys)
    assert len(keys) == 852
    assert sum(p.numel() for p in model.parameters()) == 12_821_012_544 - 10_229_760


def test_high_precision_modules_leave_exactly_the_block_linears():
    # The original's fp8 mode converts 320 linears (12,457,082,880 weights): everything outside this tuple.
    model = HYVideoDiffusionTransformer(HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"], device="meta")
    low = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not is_high_precision_module(name)
    ]
    assert len(low) == 320
    assert sum(m.weight.numel() for m in low) == 12_457_082_880
    assert set(HIGH_PRECISION_MODULES) <= {name for name, _ in model.named_children()}


def test_final_layer_linear_is_float32_in_a_bf16_model():
    model = HYVideoDiffusionTransformer(TINY, dtype=torch.bfloat16, device="meta")
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes.pop("final_layer.linear.weight") == torch.float32
    assert dtypes.pop("final_layer.linear.bias") == torch.float32
    assert set(dtypes.values()) == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# Parity with diffusers (weights converted with our converter)
# ------------------------------------------------------------------------------------------------


def diffusers_twin(model: HYVideoDiffusionTransformer):
    return diffusers_transformer(model.config, model.state_dict())


@pytest.mark.parametrize(
    "batch, valid, guidance_embed",
    [(2, (12, 7), True), (1, (9,), True), (2, (5, 12), False), (2, (12, 12), True)],
    ids=["b2-padded", "b1", "b2-no-guidance", "b2-unpadded"],
)
def test_parity_with_diffusers(batch, valid, guidance_embed):
    model = tiny_model(TINY.with_updates(guidance_embed=guidance_embed))
    twin = diffusers_twin(model)
    inputs = tiny_inputs(batch, valid=valid)
    if not guidance_embed:
        inputs["guidance"] = None
    ours = run(model, inputs)
    with torch.no_grad():
        theirs = twin(
            inputs["x"],
            inputs["t"],
            inputs["text_states"],
            inputs["text_mask"],
            inputs["text_states_2"],
            inputs["guidance"],
            return_dict=False,
        )[0]
    assert ours.shape == theirs.shape == inputs["x"].shape
    assert rel_err(ours, theirs) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Text padding
# ------------------------------------------------------------------------------------------------


def test_cropped_batch_equals_masked_batch():
    model = tiny_model()
    inputs = tiny_inputs(2, valid=(12, 7))  # different lengths: masked path
    together = run(model, inputs)
    for i in range(2):  # one sample alone: its padding is cropped, no mask
        alone = run(model, {k: v[i : i + 1] for k, v in inputs.items()})
        assert rel_err(alone[0], together[i]) <= 1e-5


def test_padded_text_tokens_do_not_influence_the_output():
    model = tiny_model()
    for valid in [(12, 7), (7, 7)]:  # masked path, then cropped path
        inputs = tiny_inputs(2, valid=valid)
        reference = run(model, inputs)
        inputs["text_states"][1, 7:] = torch.randn(5, 32) * 100
        assert rel_err(run(model, inputs), reference) <= 1e-6
        inputs["text_states"][1, 6] += 1.0  # a valid token does matter
        assert rel_err(run(model, inputs), reference) > 1e-4


def test_text_mask_none_means_all_valid():
    model = tiny_model()
    inputs = tiny_inputs(2, valid=(12, 12))
    reference = run(model, inputs)
    inputs["text_mask"] = None
    assert rel_err(run(model, inputs), reference) <= 1e-6


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.tensor([[1, 0, 1, 0]]), "right padded"),
        (torch.tensor([[0, 0, 0, 0]]), "at least one valid"),
        (torch.tensor([[1, 1, 1]]), "shape"),
    ],
)
def test_bad_text_masks_are_rejected(mask, message):
    model = tiny_model()
    inputs = tiny_inputs(1, text_len=4, valid=(4,))
    inputs["text_mask"] = mask
    with pytest.raises(ValueError, match=message):
        run(model, inputs)


# ------------------------------------------------------------------------------------------------
# Embeddings, guidance, RoPE plumbing, unpatchify
# ------------------------------------------------------------------------------------------------


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 1.0, 500.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([math.exp(-math.log(10000.0) * k / 4) for k in range(4)])
    args = t[:, None] * freqs[None]
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], dim=1))
    assert emb[0, :4].eq(1).all() and emb[0, 4:].eq(0).all()  # t = 0: cos = 1 first, sin = 0 second
    assert timestep_embedding(t, 9).shape == (3, 9) and timestep_embedding(t, 9)[:, -1].eq(0).all()


def test_guidance_is_required_and_used_by_the_distilled_model():
    model = tiny_model()
    inputs = tiny_inputs(2)
    reference = run(model, inputs)
    inputs["guidance"] = inputs["guidance"] + 1000.0
    assert rel_err(run(model, inputs), reference) > 1e-4
    inputs["guidance"] = None
    with pytest.raises(ValueError, match="guidance"):
        run(model, inputs)


def test_given_rope_tables_equal_the_internal_ones():
    from hyvideo.modules import get_rotary_pos_embed

    model = tiny_model()
    inputs = tiny_inputs(2)
    cos, sin = get_rotary_pos_embed((3, 8, 8), TINY.rope_dim_list, TINY.rope_theta, TINY.patch_size)
    given = run(model, inputs, freqs_cos=cos, freqs_sin=sin)
    assert torch.equal(given, run(model, inputs))
    assert rel_err(run(model, inputs, freqs_cos=cos, freqs_sin=sin.flip(0)), given) > 1e-4  # tables matter
    with pytest.raises(ValueError, match="RoPE tables"):
        run(model, inputs, freqs_cos=cos[:-1], freqs_sin=sin[:-1])


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2)])
def test_unpatchify_channel_order_is_c_pt_ph_pw(patch):
    pt, ph, pw = patch
    t, h, w, c, batch = 2, 3, 2, 3, 2
    x = torch.arange(batch * t * h * w * c * pt * ph * pw, dtype=torch.float32).reshape(batch, t * h * w, -1)
    out = unpatchify(x, (t, h, w), patch)
    assert out.shape == (batch, c, t * pt, h * ph, w * pw)
    for n, ci, ti, hi, wi, o, p, q in [
        (0, 0, 0, 0, 0, 0, 1, 1),
        (1, 2, 1, 2, 1, pt - 1, 0, 1),
        (1, 1, 1, 0, 1, 0, 1, 0),
    ]:
        token = (ti * h + hi) * w + wi
        feature = ((ci * pt + o) * ph + p) * pw + q
        assert out[n, ci, ti * pt + o, hi * ph + p, wi * pw + q] == x[n, token, feature]


def test_latent_not_divisible_by_patch_is_rejected():
    model = tiny_model()
    inputs = tiny_inputs(1)
    inputs["x"] = torch.randn(1, 4, 3, 7, 8)
    with pytest.raises(ValueError, match="divisible"):
        run(model, inputs)


# ------------------------------------------------------------------------------------------------
# Precision islands under bf16 autocast
# ------------------------------------------------------------------------------------------------


def test_rmsnorm_rounds_before_the_weight():
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32) + 1)
    norm = norm.to(torch.bfloat16)
    x = torch.randn(4, 32).to(torch.bfloat16) * 3
    x32 = x.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * norm.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_layernorm_and_modulate_stay_float32_under_autocast():
    x = torch.randn(2, 5, 16).to(torch.bfloat16)
    shift, scale = torch.randn(2, 16).to(torch.bfloat16), torch.randn(2, 16).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normed = FP32LayerNorm(16, elementwise_affine=False, eps=1e-6)(x)
        out = modulate(normed, shift, scale)
    expected = torch.nn.functional.layer_norm(x.float(), (16,), eps=1e-6)
    assert normed.dtype == torch.float32 and torch.equal(normed, expected)
    # (1 + scale) in bf16, the products in float32: the original's promotion under autocast
    assert out.dtype == torch.float32
    assert torch.equal(out, expected * (1 + scale[:, None]).float() + shift[:, None].float())


def test_timestep_sinusoid_is_cast_to_the_weight_dtype():
    embedder = TimestepEmbedder(32, nn.SiLU).to(torch.bfloat16)
    t = torch.tensor([999.0, 3.0])
    expected = embedder.mlp(timestep_embedding(t, 256).to(torch.bfloat16))
    assert torch.equal(embedder(t), expected)


def test_bf16_autocast_forward_is_close_to_float32():
    model = tiny_model()
    inputs = tiny_inputs(2)
    reference = run(model, inputs)
    low = HYVideoDiffusionTransformer(TINY, dtype=torch.bfloat16, attention_backend="sdpa").eval()
    low.load_state_dict(model.state_dict())
    assert low.final_layer.linear.weight.dtype == torch.float32
    inputs_low = dict(inputs, x=inputs["x"].half(), text_states=inputs["text_states"].half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(low, inputs_low)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out.float(), reference) < 5e-2
    plain = run(low, inputs_low)  # also usable without autocast (inputs are cast at the model boundary)
    assert torch.isfinite(plain).all() and rel_err(plain.float(), reference) < 5e-2
