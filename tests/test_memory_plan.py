"""The dry-run memory estimator: calibration against the published peaks, and how each option moves it."""

from __future__ import annotations

import pytest
import torch

from hyvideo.constants import HUNYUAN_VIDEO_CONFIG, DiTConfig
from hyvideo.lowmem.memory_plan import (
    LLAVA_LLAMA3_8B,
    DiTSizes,
    estimate_peak_memory,
    fit_vae_tiles,
    format_plan,
)
from hyvideo.modules import HYVideoDiffusionTransformer

FULL = HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"]
# official_spec.md §3.2 / §3.3 (derived from the checkpoint): parameter counts.
SPEC_DOUBLE_BLOCK, SPEC_SINGLE_BLOCK, SPEC_TOTAL = 339_831_296, 141_591_808, 12_821_012_544
SPEC_FP8_WEIGHTS = 12_457_082_880


TINY = DiTConfig(hidden_size=64, heads_num=2, rope_dim_list=(8, 12, 12), refiner_depth=1,
                 mm_double_blocks_depth=2, mm_single_blocks_depth=3, guidance_embed=False)


def small(**kw):
    """A small video with a tiny DiT: traced in well under a second."""
    kw = {"height": 64, "width": 96, "video_length": 9, "dit_config": TINY, **kw}
    return estimate_peak_memory(**kw)


def test_parameter_counts_match_spec_and_model():
    sizes = DiTSizes.from_config(FULL)
    assert (sizes.double_block, sizes.single_block, sizes.total(FULL)) == (
        SPEC_DOUBLE_BLOCK, SPEC_SINGLE_BLOCK, SPEC_TOTAL)
    assert 20 * sizes.double_fp8_weights + 40 * sizes.single_fp8_weights == SPEC_FP8_WEIGHTS
    for config in (FULL, DiTConfig(hidden_size=64, heads_num=2, rope_dim_list=(8, 12, 12), refiner_depth=1,
                                   mm_double_blocks_depth=2, mm_single_blocks_depth=3, guidance_embed=False)):
        with torch.device("meta"):
            model = HYVideoDiffusionTransformer(config, attention_backend="sdpa")
        sizes = DiTSizes.from_config(config)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert sizes.total(config) == count(model)
        assert sizes.double_block == count(model.double_blocks[0])
        assert sizes.single_block == count(model.single_blocks[0])
        assert sizes.final_linear == count(model.final_layer.linear)


def test_llm_size():
    # LLaVA-Llama-3-8B's language model: ~7.5B parameters, ~15 GB in fp16; its rest (embeddings) ~1 GiB.
    assert LLAVA_LLAMA3_8B.params == 7_504_924_672
    assert LLAVA_LLAMA3_8B.rest_params + 32 * LLAVA_LLAMA3_8B.layer_params == LLAVA_LLAMA3_8B.params


def test_stage_residency_per_mode():
    none, model, block, seq = (small(offload_mode=m) for m in ("none", "model", "block", "sequential"))
    all_weights = none.dit_weights_total_gib + none.text_encoder_weights_gib + none.vae_weights_gib
    assert [s.weights_gib for s in none.stages] == pytest.approx([all_weights] * 3)
    assert [s.weights_gib for s in model.stages] == pytest.approx(
        [model.text_encoder_weights_gib, model.dit_weights_total_gib, model.vae_weights_gib])
    # Block offload streams the LLM's layers: encoding holds ~1.9 GiB of text encoder weights, not 14.
    assert block.stages[0].weights_gib < 2.5 < model.stages[0].weights_gib
    assert none.peak_gib > block.peak_gib and none.host_weights_gib == 0 and block.host_weights_gib > 10
    # Same traced activations whatever the mode
    assert none.activations_gib == block.activations_gib == seq.activations_gib > 0


def test_cfg_doubles_the_traced_activations_and_tiles_bound_decode():
    one, cfg = small(), small(cfg_scale=6.0)
    assert cfg.batch == 2 * one.batch
    assert cfg.activations_gib == pytest.approx(2 * one.activations_gib, rel=0.05)
    wide = dict(height=512, width=512, video_length=9)
    assert small(vae_tiling=False, **wide).vae_decode_workspace_gib > small(**wide).vae_decode_workspace_gib
    assert small(vae_tile_size=128, **wide).vae_decode_workspace_gib < small(**wide).vae_decode_workspace_gib


def test_format_plan_and_bad_input():
    text = format_plan(small(), card_gib=24)
    assert "traced" in text.lower() and "64x96" in text and "fits" in text
    with pytest.raises(ValueError, match="4k\\+1"):
        estimate_peak_memory(height=544, width=960, video_length=128)
    with pytest.raises(ValueError, match="offload_mode"):
        estimate_peak_memory(height=544, width=960, video_length=129, offload_mode="cpu")
    with pytest.raises(ValueError, match="precision"):
        estimate_peak_memory(height=544, width=960, video_length=129, precision="fp8")


@pytest.mark.slow
@pytest.mark.parametrize("size,frames,card,limit", [((720, 1280), 129, 12, 10.5), ((544, 960), 129, 8, 7.0),
                                                      ((720, 1280), 241, 24, 21.0)])
def test_issue_targets_with_fp8_and_offload(size, frames, card, limit):
    est = fit_vae_tiles(card, height=size[0], width=size[1], video_length=frames, use_fp8=True,
                        offload_mode="block")
    assert est.peak_gib <= limit and est.host_weights_gib <= 32
