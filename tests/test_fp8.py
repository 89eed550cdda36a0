"""FP8 weights: FP8Linear numerics, conversion by name, quantisation, the official file pair, clear errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyvideo.constants import HUNYUAN_VIDEO_CONFIG, DiTConfig
from hyvideo.modules import HIGH_PRECISION_MODULES, HYVideoDiffusionTransformer, load_dit_weights
from hyvideo.modules.fp8_optimization import (
    FP8_EXCLUDED,
    FP8Linear,
    convert_fp8_linear,
    fp8_layer_names,
    fp8_map_path,
    fp8_scale_for,
    fp8_weight_names,
    load_fp8_checkpoint,
    load_fp8_dit,
    quantize_state_dict,
    quantize_weight,
)
from tests.helpers import rel_err

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "convert_to_fp8.py"
FP8 = torch.float8_e4m3fn
TINY = DiTConfig(
    hidden_size=64, heads_num=2, rope_dim_list=(8, 12, 12), mm_double_blocks_depth=2,
    mm_single_blocks_depth=2, refiner_depth=1, text_states_dim=32, text_states_dim_2=16, in_channels=4,
    out_channels=4, guidance_embed=True,
)
TINY_FP8_LAYERS = 2 * 10 + 2 * 3  # 10 Linear per double block, 3 per single block


@pytest.fixture(scope="module")
def bf16_weights() -> dict[str, torch.Tensor]:
    """Random tiny-DiT weights stored in bf16, like the official release."""
    gen = torch.Generator().manual_seed(1)
    model = HYVideoDiffusionTransformer(TINY, device="meta")
    return {k: (torch.randn(v.shape, generator=gen) * 0.2).bfloat16() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def fp8_pair(bf16_weights, tmp_path_factory) -> tuple[Path, Path]:
    """The official fp8 file pair written from `quantize_state_dict`."""
    folder = tmp_path_factory.mktemp("transformers")
    fp8_weights, scale_map = quantize_state_dict(bf16_weights)
    weights_path = folder / "mp_rank_00_model_states_fp8.pt"
    torch.save({"module": fp8_weights}, weights_path)
    torch.save(scale_map, folder / "mp_rank_00_model_states_fp8_map.pt")
    return weights_path, folder / "mp_rank_00_model_states_fp8_map.pt"


def inputs() -> tuple:
    gen = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    x = torch.randn(2, 4, 1, 4, 4, generator=gen)
    text_states = torch.randn(2, 6, 32, generator=gen)
    pooled = torch.randn(2, 16, generator=gen)
    return x, torch.tensor([10.0, 900.0]), text_states, mask, pooled, torch.tensor([6016.0, 6016.0])


def forward(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs())


def reference_model(state_dict: dict[str, torch.Tensor]) -> HYVideoDiffusionTransformer:
    model = HYVideoDiffusionTransformer(TINY, device="meta", attention_backend="sdpa")
    return load_dit_weights(model, state_dict, device="cpu").eval()


def load_tiny(weights_path: Path, **kw) -> HYVideoDiffusionTransformer:
    return load_fp8_dit(TINY, weights_path, dtype=torch.float32, attention_backend="sdpa", **kw)


def load_script():
    spec = importlib.util.spec_from_file_location("convert_to_fp8", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_quant_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The original's (dead) fake-quantisation formula of spec §3.3, written out as a reference."""
    x = x.clamp(-448.0, 448.0)
    exponent = (torch.floor(torch.log2(x.abs())) + 7).clamp(min=1)
    step = 2.0 ** (exponent - 3 - 7)
    return torch.round(x / step) * step


# ------------------------------------------------------------------------------------------------
# FP8Linear and the quantiser
# ------------------------------------------------------------------------------------------------


def test_fp8_linear_equals_the_bf16_dequant_formula_exactly():
    layer = FP8Linear(48, 40, compute_dtype=torch.bfloat16)
    w8 = (torch.randn(40, 48) * 100).to(FP8)
    scale = torch.tensor(0.0123457)  # not a bf16 value: the product must round the bf16 scale
    bias = torch.randn(40).bfloat16()
    with torch.no_grad():
        layer.weight.copy_(w8)
        layer.bias.copy_(bias)
    layer.fp8_scale = scale
    x = torch.randn(3, 5, 48).bfloat16()
    with torch.no_grad():
        out = layer(x)
    expected = F.linear(x, w8.to(torch.bfloat16) * scale.to(torch.bfloat16), bias)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    # The formula matters: a float32 product rounded afterwards gives different numbers.
    other = F.linear(x, (w8.float() * scale).to(torch.bfloat16), bias)
    assert not torch.equal(out, other)


def test_quantize_weight_matches_the_original_fake_quant_grid():
    weight = torch.cat((torch.randn(4000) * 0.05, torch.randn(100) * 1e-5, torch.tensor([0.0, 0.3, -0.3])))
    scale = fp8_scale_for(weight)
    assert scale.dtype == torch.float32 and scale.ndim == 0
    assert scale == weight.abs().max() / 448.0
    q = quantize_weight(weight, scale)
    assert q.dtype == FP8
    assert torch.equal(q.float(), fake_quant_e4m3(weight / scale))
    assert q.float().abs().max() == 448.0  # the largest weight lands on the top of the range
    assert rel_err(q.float() * scale, weight) < 2**-4


def test_fp8_linear_error_is_bounded_by_the_rounding():
    # Each quantised weight is within 2^-4 (half a 3-bit mantissa step) of W / scale, relatively, so
    # |y_fp8 - y| <= 2^-4 * (|W| @ |x|) elementwise, up to float32 rounding.
    linear = nn.Linear(256, 96)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 256) * 0.05)
    x = torch.randn(8, 256)
    fp8 = FP8Linear(256, 96, compute_dtype=torch.float32)
    scale = fp8_scale_for(linear.weight)
    with torch.no_grad():
        fp8.weight.copy_(quantize_weight(linear.weight, scale))
        fp8.bias.copy_(linear.bias)
        fp8.fp8_scale = scale
        err = (fp8(x) - linear(x)).abs()
        bound = 2**-4 * (x.abs() @ linear.weight.abs().T) + 1e-5
    assert (err <= bound).all()
    assert err.max() > 1e-3 * bound.max()


def test_zero_weight_gets_scale_one():
    scale = fp8_scale_for(torch.zeros(4, 4, dtype=torch.bfloat16))
    assert scale == 1.0
    assert torch.equal(quantize_weight(torch.zeros(4, 4), scale).float(), torch.zeros(4, 4))


def test_quantize_state_dict_converts_exactly_the_block_linears(bf16_weights):
    fp8_weights, scale_map = quantize_state_dict(bf16_weights)
    model = HYVideoDiffusionTransformer(TINY, device="meta")
    assert list(scale_map) == fp8_layer_names(model) == fp8_weight_names(bf16_weights)
    assert len(scale_map) == TINY_FP8_LAYERS
    for key, tensor in fp8_weights.items():
        quantised = key.endswith(".weight") and key[: -len(".weight")] in scale_map
        assert tensor.dtype == (FP8 if quantised else torch.bfloat16), key
        if not quantised:
            assert tensor is bf16_weights[key]
    with pytest.raises(ValueError, match="already fp8"):
        quantize_state_dict(fp8_weights)


# ------------------------------------------------------------------------------------------------
# Which layers are converted
# ------------------------------------------------------------------------------------------------


def test_full_size_conversion_is_the_originals_320_layers():
    model = HYVideoDiffusionTransformer(HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"], device="meta")
    keys_before = [(k, v.shape) for k, v in model.state_dict().items()]
    names = fp8_layer_names(model)
    converted = convert_fp8_linear(model, {n: torch.tensor(1.0) for n in names})
    assert converted == names and len(names) == 320
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == 320
    assert sum(m.weight.numel() for m in layers) == 12_457_082_880
    assert all("double_blocks" in n or "single_blocks" in n for n in names)
    # The scale is not a state-dict key: the official weights file has none.
    assert [(k, v.shape) for k, v in model.state_dict().items()] == keys_before


def test_exclusion_list_is_the_dits_high_precision_tuple():
    assert FP8_EXCLUDED is HIGH_PRECISION_MODULES
    model = HYVideoDiffusionTransformer(TINY, device="meta")
    names = set(fp8_layer_names(model))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    kept = {n for n in linears if n.split(".", 1)[0] in FP8_EXCLUDED}
    assert linears - names == kept
    assert {n.split(".", 1)[0] for n in kept} == set(FP8_EXCLUDED) - {"img_in"}  # img_in is a Conv3d


# ------------------------------------------------------------------------------------------------
# Loading the official pair
# ------------------------------------------------------------------------------------------------


def test_loaded_model_structure_and_dtypes(fp8_pair):
    model = load_tiny(fp8_pair[0])
    converted = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(converted) == TINY_FP8_LAYERS
    for name in converted:
        layer = model.get_submodule(name)
        assert layer.weight.dtype == FP8 and layer.bias.dtype == torch.float32, name
    excluded = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
    for name, module in model.named_modules():
        if name.startswith(excluded):
            assert not isinstance(module, FP8Linear), name
            if isinstance(module, (nn.Linear, nn.Conv3d)):
                assert module.weight.dtype == torch.float32, name
    assert not model.training


def test_fp8_model_matches_the_bf16_model(fp8_pair, bf16_weights):
    # Tolerance 1e-1 (float32 compute). E4M3 keeps 3 mantissa bits, so each weight moves by up to 2^-4 of its
    # value (about 2.5% RMS) and one layer's output by a few percent (bounded exactly in
    # test_fp8_linear_error_is_bounded_by_the_rounding). With D = 64 a dot product averages only 64 of these
    # errors, and 26 quantised layers in series (random weights, gain > 1) compound them: over weight seeds
    # 0-7 the max error relative to the largest output is 3-8% (7.1e-2 for this seed). This check is coarse:
    # the final LayerNorm hides magnitudes, so even dropping the scales only gives 0.2 here. The exact checks
    # are test_fp8_model_equals_a_model_with_the_dequantised_weights and the FP8Linear formula test.
    fp8_out = forward(load_tiny(fp8_pair[0]))
    ref_out = forward(reference_model(bf16_weights))
    err = rel_err(fp8_out, ref_out)
    assert 1e-3 < err <= 1e-1  # > 1e-3: the weights really were rounded to fp8


def test_fp8_model_equals_a_model_with_the_dequantised_weights(fp8_pair):
    # Same numbers through nn.Linear: float32(w_fp8) * scale as plain float32 weights.
    state_dict, scale_map = load_fp8_checkpoint(fp8_pair[0])
    dequantised = {
        k: (v.float() * scale_map[k.removesuffix(".weight")] if v.dtype == FP8 else v)
        for k, v in state_dict.items()
    }
    assert torch.equal(forward(load_tiny(fp8_pair[0])), forward(reference_model(dequantised)))


def test_scales_in_other_dtypes_and_shapes_load(fp8_pair, tmp_path):
    weights_path, map_path = fp8_pair
    scale_map = torch.load(map_path, weights_only=True)
    bf16_map = {k: v.reshape(1).bfloat16() for k, v in scale_map.items()}
    torch.save(bf16_map, tmp_path / "other_map.pt")
    _, loaded = load_fp8_checkpoint(weights_path, tmp_path / "other_map.pt")
    assert all(loaded[k].shape == () and loaded[k] == v.float() for k, v in bf16_map.items())


def test_map_path_only_changes_the_file_name(tmp_path, bf16_weights):
    folder = tmp_path / "foo.pt.d"
    assert fp8_map_path(folder / "w_fp8.pt") == folder / "w_fp8_map.pt"
    assert fp8_map_path("a.pt/b.pt/mp_rank_00_model_states_fp8.pt") == Path(
        "a.pt/b.pt/mp_rank_00_model_states_fp8_map.pt"
    )
    with pytest.raises(ValueError, match="does not end in '.pt'"):
        fp8_map_path(folder / "w_fp8.safetensors")
    folder.mkdir()
    fp8_weights, scale_map = quantize_state_dict(bf16_weights)
    torch.save(fp8_weights, folder / "w_fp8.pt")  # flat, not wrapped: accepted too
    torch.save(scale_map, folder / "w_fp8_map.pt")
    assert len(load_fp8_checkpoint(folder / "w_fp8.pt")[1]) == TINY_FP8_LAYERS


# ------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------


def test_missing_map_names_the_expected_path(fp8_pair, tmp_path):
    lonely = tmp_path / "lonely_fp8.pt"
    lonely.write_bytes(fp8_pair[0].read_bytes())
    with pytest.raises(FileNotFoundError, match=r"lonely_fp8_map\.pt does not exist"):
        load_fp8_checkpoint(lonely)


def test_map_with_a_missing_or_extra_layer(fp8_pair, tmp_path):
    weights_path, map_path = fp8_pair
    scale_map = torch.load(map_path, weights_only=True)
    short = dict(scale_map)
    del short["single_blocks.1.linear2"]
    torch.save(short, tmp_path / "short.pt")
    message = r"26 fp8 layers:\n  fp8 layers without a scale, 1: single_blocks\.1\.linear2$"
    with pytest.raises(ValueError, match=message):
        load_tiny(weights_path, map_path=tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"without a scale, 1: single_blocks\.1\.linear2$"):
        convert_fp8_linear(HYVideoDiffusionTransformer(TINY, device="meta"), short)
    # Without the model's layer names, the file check still catches the fp8 weight that has no scale.
    with pytest.raises(ValueError, match=r"no scale in the map, 1: single_blocks\.1\.linear2\.weight"):
        load_fp8_checkpoint(weights_path, tmp_path / "short.pt")
    extra = {**scale_map, "double_blocks.7.img_attn_qkv": torch.tensor(1.0)}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"name no fp8 layer, 1: double_blocks\.7\.img_attn_qkv"):
        load_tiny(weights_path, map_path=tmp_path / "extra.pt")
    suffixed = {f"{k}.weight": v for k, v in scale_map.items()}
    torch.save(suffixed, tmp_path / "suffixed.pt")
    with pytest.raises(ValueError, match=r"(?s)26 fp8 layers.*without the '\.weight' suffix"):
        load_tiny(weights_path, map_path=tmp_path / "suffixed.pt")


def test_bad_scale_values(fp8_pair, tmp_path):
    scale_map = torch.load(fp8_pair[1], weights_only=True)
    bad_values = {"vector": torch.ones(2), "int": torch.tensor(1), "nan": torch.tensor(float("nan"))}
    for name, bad in bad_values.items():
        torch.save({**scale_map, "double_blocks.0.img_mlp.fc1": bad}, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=r"double_blocks\.0\.img_mlp\.fc1"):
            load_fp8_checkpoint(fp8_pair[0], tmp_path / f"{name}.pt")


def test_bf16_weights_with_use_fp8_are_refused(fp8_pair, bf16_weights, tmp_path):
    torch.save({"module": bf16_weights}, tmp_path / "bf16.pt")
    with pytest.raises(ValueError, match=r"is not an fp8 checkpoint.*torch\.bfloat16.*without --use-fp8"):
        load_tiny(tmp_path / "bf16.pt", map_path=fp8_pair[1])


def test_fp8_tensor_without_a_scale_is_refused(fp8_pair, bf16_weights, tmp_path):
    fp8_weights, scale_map = quantize_state_dict(bf16_weights)
    fp8_weights["final_layer.linear.weight"] = fp8_weights["final_layer.linear.weight"].to(FP8)
    torch.save(fp8_weights, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"no scale in the map, 1: final_layer\.linear\.weight"):
        load_fp8_checkpoint(tmp_path / "odd.pt", fp8_pair[1])


def test_converting_twice_is_refused():
    model = HYVideoDiffusionTransformer(TINY, device="meta")
    scales = {n: torch.tensor(1.0) for n in fp8_layer_names(model)}
    convert_fp8_linear(model, scales)
    with pytest.raises(ValueError, match="applied twice"):
        convert_fp8_linear(model, scales)


def test_converting_a_loaded_model_quantises_its_weights(bf16_weights, fp8_pair):
    # The in-memory route (convert a materialised model) gives the same model as the file route.
    model = reference_model(bf16_weights)
    convert_fp8_linear(model, quantize_state_dict(bf16_weights)[1], compute_dtype=torch.float32)
    assert torch.equal(forward(model), forward(load_tiny(fp8_pair[0])))


# ------------------------------------------------------------------------------------------------
# scripts/convert_to_fp8.py
# ------------------------------------------------------------------------------------------------


def test_convert_script_end_to_end(bf16_weights, fp8_pair, tmp_path):
    source = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": bf16_weights, "ema": bf16_weights}, source)
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(source), "--output-dir", str(out_dir)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    written = torch.load(out_dir / "mp_rank_00_model_states_fp8.pt", weights_only=True)
    assert list(written) == ["module"]
    expected_weights, expected_map = quantize_state_dict(bf16_weights)
    assert all(torch.equal(written["module"][k].view(torch.uint8) if v.dtype == FP8 else written["module"][k],
                           v.view(torch.uint8) if v.dtype == FP8 else v) for k, v in expected_weights.items())
    written_map = torch.load(out_dir / "mp_rank_00_model_states_fp8_map.pt", weights_only=True)
    assert written_map.keys() == expected_map.keys()
    assert all(torch.equal(written_map[k], v) for k, v in expected_map.items())
    converted = load_tiny(out_dir / "mp_rank_00_model_states_fp8.pt")
    assert torch.equal(forward(converted), forward(load_tiny(fp8_pair[0])))


def test_convert_script_errors(bf16_weights, fp8_pair, tmp_path, capsys):
    script = load_script()
    not_dit = tmp_path / "not_dit.pt"
    torch.save({"module": {"layer.weight": torch.ones(2, 2)}}, not_dit)
    text_file = tmp_path / "notes.pt"
    text_file.write_text("not a checkpoint")
    cases = [
        (tmp_path / "absent.pt", "does not exist"),
        (not_dit, "not a HunyuanVideo DiT state dict"),
        (text_file, "is not a DiT checkpoint"),
        (fp8_pair[0], "already fp8"),
    ]
    for source, message in cases:
        assert script.main(["--input", str(source), "--output-dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
    source = tmp_path / "ok.pt"
    torch.save(bf16_weights, source)
    assert script.main(["--input", str(source), "--output-dir", str(tmp_path / "o")]) == 0
    assert script.main(["--input", str(source), "--output-dir", str(tmp_path / "o")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert script.main(["--input", str(source), "--output-dir", str(tmp_path / "o"), "--overwrite"]) == 0


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_fp8_dit_on_gpu_matches_cpu(fp8_pair):
    cpu = forward(load_tiny(fp8_pair[0]))
    model = load_fp8_dit(TINY, fp8_pair[0], dtype=torch.float32, device="cuda", attention_backend="sdpa")
    assert all(b.device.type == "cuda" for b in model.buffers())
    with torch.no_grad():
        gpu = model(*(t.cuda() for t in inputs()))
    assert rel_err(gpu.cpu(), cpu) < 1e-4
