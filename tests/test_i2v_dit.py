"""I2V in the DiT: token replace (first-frame modulation from t = 0) and the legacy 33-channel checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from hyvideo.modules import HYVideoDiffusionTransformer
from hyvideo.modules.loading import load_dit
from hyvideo.testing.peers import diffusers_transformer
from hyvideo.testing.tiny import write_dit
from tests.helpers import TINY_DIT_TEST, rel_err

TR = TINY_DIT_TEST.with_updates(image_condition_type="token_replace")


def models(config=TR):
    """A token-replace DiT and a plain T2V DiT with the same random weights."""
    tr = HYVideoDiffusionTransformer(config).eval()
    with torch.no_grad():
        for p in tr.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    plain = HYVideoDiffusionTransformer(config.with_updates(image_condition_type=None)).eval()
    plain.load_state_dict(tr.state_dict())
    return tr, plain


def inputs(t: float, guidance: bool = True, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, 10)
    mask[-1, 6:] = 0
    return {
        "x": torch.randn(batch, 4, 3, 8, 8, generator=g),
        "t": torch.full((batch,), t),
        "text_states": torch.randn(batch, 10, 32, generator=g),
        "text_mask": mask,
        "text_states_2": torch.randn(batch, 16, generator=g),
        "guidance": torch.full((batch,), 6000.0) if guidance else None,
    }


def run(model, kw):
    with torch.no_grad():
        return model(**kw)


def test_guidance_off_t0_equals_plain_t2v_and_differs_elsewhere():
    tr, plain = models(TR.with_updates(guidance_embed=False))
    kw = inputs(0.0, guidance=False)
    # at t = 0 the token-replace vector equals the normal one: same maths, bit for bit
    assert torch.equal(run(tr, kw), run(plain, kw))
    kw = inputs(700.0, guidance=False)
    ours, t2v = run(tr, kw), run(plain, kw)
    assert rel_err(ours, t2v) > 1e-3
    # the first-frame tokens are modulated differently, but every token sees them through attention
    assert not torch.equal(ours[:, :, 1:], t2v[:, :, 1:])


def test_token_replace_vector_has_no_guidance_term():
    # With guidance_in, t = 0 still differs from T2V: vec has the guidance term, tr_vec does not.
    tr, plain = models()
    kw = inputs(0.0)
    assert rel_err(run(tr, kw), run(plain, kw)) > 1e-3
    vec = tr._token_replace_vec(kw["t"], kw["text_states_2"])
    expected = tr.time_in(torch.zeros(2)) + tr.vector_in(kw["text_states_2"])
    assert torch.equal(vec, expected)


@pytest.mark.parametrize("guidance", [True, False])
def test_parity_with_diffusers_token_replace(guidance):
    tr, _ = models(TR.with_updates(guidance_embed=guidance))
    twin = diffusers_transformer(tr.config, tr.state_dict())
    kw = inputs(430.0, guidance=guidance)
    with torch.no_grad():
        theirs = twin(
            kw["x"],
            kw["t"],
            kw["text_states"],
            kw["text_mask"],
            kw["text_states_2"],
            kw["guidance"],
            return_dict=False,
        )[0]
    assert rel_err(run(tr, kw), theirs) <= 1e-5


def test_chunked_blocks_equal_unchunked_with_token_replace():
    tr, _ = models()
    kw = inputs(300.0)
    whole = run(tr, kw)
    tr.set_chunk_tokens(5)  # chunks cut through frame 0's 16 tokens and the image/text boundary
    # Chunking changes matmul shapes only; float32 reassociation stays ~1e-7.
    assert rel_err(run(tr, kw), whole) <= 1e-5


def test_legacy_latent_concat_checkpoint_loads_strictly(tmp_path):
    legacy = TINY_DIT_TEST.with_updates(
        in_channels=9, out_channels=4, guidance_embed=False, image_condition_type="latent_concat"
    )
    path = write_dit(tmp_path / "transformers", legacy)
    assert json.loads((tmp_path / "transformers" / "dit_config.json").read_text())["in_channels"] == 9
    model = load_dit(legacy, path, dtype=torch.float32)
    assert model.img_in.proj.weight.shape[1] == 9 and model.guidance_in is None
    with pytest.raises(Exception, match="guidance_in|missing|shape"):
        load_dit(legacy.with_updates(guidance_embed=True), path, dtype=torch.float32)
    x = torch.randn(1, 9, 2, 4, 4)
    out = run(
        model,
        {
            "x": x,
            "t": torch.tensor([500.0]),
            "text_states": torch.randn(1, 5, 32),
            "text_mask": None,
            "text_states_2": torch.randn(1, 16),
        },
    )
    assert out.shape == (1, 4, 2, 4, 4)
