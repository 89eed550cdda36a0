"""LoRAs: the three key layouts, parity with diffusers' loader, stacking, exact unloading, fp8 side path,
block offload, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from hyvideo.modules import HYVideoDiffusionTransformer
from hyvideo.modules.fp8_optimization import FP8Linear, convert_fp8_linear, quantize_state_dict
from hyvideo.modules.lora import LoraStack, merge_layer, unmerge_layer
from hyvideo.modules.lora_files import read_lora
from hyvideo.testing.loras import random_diffusers_lora, to_kohya_layout, to_original_layout
from hyvideo.testing.peers import diffusers_transformer
from tests.helpers import TINY_DIT_TEST, rel_err

pytest.importorskip("peft")  # diffusers' LoRA loading needs it (requirements-test.txt)

TINY = TINY_DIT_TEST


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> HYVideoDiffusionTransformer:
    gen = torch.Generator().manual_seed(seed)
    model = HYVideoDiffusionTransformer(TINY, attention_backend="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.to(dtype)


def inputs(dtype: torch.dtype = torch.float32) -> tuple:
    gen = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    return (torch.randn(2, 4, 1, 4, 4, generator=gen).to(dtype), torch.tensor([10.0, 900.0]),
            torch.randn(2, 6, 32, generator=gen).to(dtype), mask, torch.randn(2, 16, generator=gen).to(dtype),
            torch.tensor([6016.0, 6016.0]))


@torch.no_grad()
def run(model, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return model(*inputs(dtype)).float()


@torch.no_grad()
def run_twin(twin) -> torch.Tensor:
    return twin(*inputs(), return_dict=False)[0]


def diffusers_pipe(model):
    """diffusers' pipeline around a twin of `model` (its own copy of the weights)."""
    from diffusers import HunyuanVideoPipeline

    twin = diffusers_transformer(model.config, {k: v.clone() for k, v in model.state_dict().items()})
    return HunyuanVideoPipeline(transformer=twin, vae=None, text_encoder=None, tokenizer=None,
                                text_encoder_2=None, tokenizer_2=None, scheduler=None)


def save(tmp_path, name: str, tensors: dict) -> str:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def load(model, *paths_and_scales, **kw) -> LoraStack:
    stack = LoraStack(model)
    for path, scale in paths_and_scales:
        stack.add(read_lora(path, model, **kw), scale)
    return stack


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def lora_a(model):
    return random_diffusers_lora(model, rank=4, std=0.15, seed=10)


@pytest.fixture(scope="module")
def reference_a(model, tmp_path_factory, lora_a):
    """diffusers' output with LoRA A loaded by diffusers in its own layout."""
    pipe = diffusers_pipe(model)
    pipe.load_lora_weights(save(tmp_path_factory.mktemp("ref"), "a", lora_a), adapter_name="a")
    return run_twin(pipe.transformer)


# ------------------------------------------------------------------------------------------------
# Parity with diffusers, every layout
# ------------------------------------------------------------------------------------------------


def test_diffusers_layout_matches_diffusers(model, tmp_path, lora_a, reference_a):
    base = run(model)
    stack = load(model, (save(tmp_path, "a", lora_a), 1.0))
    try:
        assert stack.entries["a"].weights.layout == "diffusers"
        ours = run(model)
    finally:
        stack.clear()
    assert rel_err(reference_a, base) > 1e-1  # the LoRA really changes the output
    assert rel_err(ours, reference_a) <= 1e-5


@pytest.mark.parametrize(
    "layout",
    ["original-diffusion_model", "original-transformer", "kohya-alpha", "kohya-no-alpha", "i2v-kohya"],
)
def test_every_layout_matches_diffusers_loading_its_own_layout(model, tmp_path, lora_a, reference_a, layout):
    # diffusers cannot load these files at this size (its original-layout converter hard-codes hidden
    # size 3072 for single-block linear1, splits refiner qkv and final-modulation lora_A, and has no kohya
    # converter for HunyuanVideo), so the peer loads the same LoRA saved in diffusers' layout.
    writers = {
        "original-diffusion_model": lambda: to_original_layout(lora_a, model, "diffusion_model."),
        "original-transformer": lambda: to_original_layout(lora_a, model, "transformer."),
        "kohya-alpha": lambda: to_kohya_layout(lora_a, model, alpha=2.0),
        "kohya-no-alpha": lambda: to_kohya_layout(lora_a, model),
        "i2v-kohya": lambda: to_kohya_layout(lora_a, model, prefix="Hunyuan_video_I2V_lora_"),
    }
    stack = load(model, (save(tmp_path, layout, writers[layout]()), 1.0))
    try:
        assert stack.entries[layout].weights.layout == layout.split("-")[0].replace("i2v", "kohya")
        ours = run(model)
    finally:
        stack.clear()
    assert rel_err(ours, reference_a) <= 1e-5


def test_original_layout_matches_diffusers_loading_it(model, tmp_path):
    # The layers diffusers' own converter maps correctly at any size: double blocks, linear2, modulation.
    lora = random_diffusers_lora(model, rank=3, std=0.15, seed=11,
                                 select=lambda n: n.startswith("double_blocks") or not n.endswith("linear1")
                                 and n.startswith("single_blocks"))
    path = save(tmp_path, "orig", to_original_layout(lora, model, "diffusion_model."))
    pipe = diffusers_pipe(model)
    pipe.load_lora_weights(path, adapter_name="orig")
    stack = load(model, (path, 1.0))
    try:
        ours = run(model)
    finally:
        stack.clear()
    assert rel_err(ours, run_twin(pipe.transformer)) <= 1e-5


def test_two_stacked_loras_with_different_scales(model, tmp_path, lora_a):
    lora_b = random_diffusers_lora(model, rank=2, std=0.15, seed=12, select=lambda n: "mlp" in n or "linear" in n)
    path_a, path_b = save(tmp_path, "a", lora_a), save(tmp_path, "b", to_kohya_layout(lora_b, model, alpha=1.0))
    pipe = diffusers_pipe(model)
    pipe.load_lora_weights(path_a, adapter_name="a")
    pipe.load_lora_weights(save(tmp_path, "b_diffusers", lora_b), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, -0.4])
    stack = load(model, (path_a, 0.7), (path_b, -0.4))
    try:
        assert rel_err(run(model), run_twin(pipe.transformer)) <= 1e-5
        stack.set_scale("a", 1.3)  # re-scaling re-merges from the original weights
        pipe.set_adapters(["a", "b"], [1.3, -0.4])
        assert rel_err(run(model), run_twin(pipe.transformer)) <= 1e-5
    finally:
        stack.clear()


def test_ignore_alpha_uses_factor_one(model, tmp_path, lora_a):
    with_alpha = to_kohya_layout(lora_a, model, alpha=2.0)  # B stored as B * rank / alpha
    without_alpha = {k: v for k, v in with_alpha.items() if not k.endswith(".alpha")}
    stack = load(model, (save(tmp_path, "no_alpha", without_alpha), 0.5))
    expected = run(model)
    stack.clear()
    ignored = load(model, (save(tmp_path, "alpha", with_alpha), 0.5), ignore_alpha=True)
    try:
        assert torch.equal(run(model), expected)
    finally:
        ignored.clear()


# ------------------------------------------------------------------------------------------------
# Unloading, scale 0
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unload_restores_the_weights_bit_exactly(tmp_path, dtype):
    model = tiny_model(dtype, seed=3)
    original = copy.deepcopy(model.state_dict())
    big = random_diffusers_lora(model, rank=8, std=0.5, seed=4)  # deltas as large as the weights
    small = random_diffusers_lora(model, rank=2, std=0.02, seed=5)
    stack = load(model, (save(tmp_path, "big", big), 1.0), (save(tmp_path, "small", small), 2.0))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert len(changed) > 30
    stack.set_scale("big", -0.3)
    stack.remove("small")
    stack.clear()
    assert not stack._merged and not stack.entries
    for key, value in model.state_dict().items():
        assert torch.equal(value.view(torch.uint8), original[key].view(torch.uint8)), key


def test_restore_keeps_far_less_than_a_copy():
    layer = torch.nn.Linear(256, 192).bfloat16()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(192, 256, generator=gen) * 0.02)
    original = layer.weight.detach().clone()
    # A LoRA whose update is ~10% of the weights (rms), as trained LoRAs are.
    down, up = torch.randn(8, 256, generator=gen) * 0.01, torch.randn(192, 8, generator=gen) * 0.02
    record = merge_layer(layer, down, up, torch.device("cpu"))
    assert not torch.equal(layer.weight, original)
    assert record.original is None and 0 < record.fix_index.numel() < 0.05 * original.numel()
    unmerge_layer(layer, record)
    assert torch.equal(layer.weight.view(torch.int16), original.view(torch.int16))


def test_scale_zero_equals_no_lora(model, tmp_path, lora_a):
    base = run(model)
    stack = load(model, (save(tmp_path, "a", lora_a), 0.0))
    assert torch.equal(run(model), base)
    stack.set_scale("a", 1.0)
    assert not torch.equal(run(model), base)
    stack.set_scale("a", 0.0)
    assert torch.equal(run(model), base)
    stack.clear()


# ------------------------------------------------------------------------------------------------
# fp8: side path
# ------------------------------------------------------------------------------------------------


def fp8_twin(model: HYVideoDiffusionTransformer) -> HYVideoDiffusionTransformer:
    """`model` with its block linears stored in fp8 (float32 compute) like `--use-fp8`."""
    fp8_model = copy.deepcopy(model)
    _, scale_map = quantize_state_dict(model.state_dict())
    convert_fp8_linear(fp8_model, scale_map, compute_dtype=torch.float32)
    return fp8_model


def dequantised(fp8_model) -> HYVideoDiffusionTransformer:
    """A plain model holding the fp8 model's dequantised weights."""
    plain = tiny_model()
    state = {}
    for name, module in fp8_model.named_modules():
        if isinstance(module, FP8Linear):
            state[f"{name}.weight"] = module.weight.float() * module.fp8_scale
    plain.load_state_dict({**fp8_model.state_dict(), **state})
    return plain


def test_fp8_side_path(model, tmp_path, lora_a):
    path = save(tmp_path, "a", lora_a)
    fp8_model = fp8_twin(model)
    fp8_base = run(fp8_model)
    plain = dequantised(fp8_model)  # before the LoRA: the non-fp8 layers get it merged
    stored = {k: v.clone() for k, v in fp8_model.state_dict().items()}
    stack = load(fp8_model, (path, 0.5))
    fp8_lora = run(fp8_model)
    fp8_keys = [k for k, v in stored.items() if v.dtype == torch.float8_e4m3fn]
    assert len(fp8_keys) == 26
    state = fp8_model.state_dict()
    assert all(torch.equal(state[k].view(torch.uint8), stored[k].view(torch.uint8)) for k in fp8_keys)
    assert len(stack._hooks) == 26 and stack._merged  # 26 fp8 layers on the side path, the rest merged
    # Exact check: the side path equals merging the LoRA into the dequantised weights (float32).
    merged = load(plain, (path, 0.5))
    assert rel_err(fp8_lora, run(plain)) <= 1e-5
    merged.clear()
    # Against the high-precision model with the LoRA merged: within test_fp8.py's fp8 tolerance (1e-1),
    # and much closer than the fp8 model without the LoRA.
    reference = load(model, (path, 0.5))
    high = run(model)
    reference.clear()
    assert rel_err(fp8_lora, high) <= 1e-1 < rel_err(fp8_base, high)
    stack.clear()
    assert not stack._hooks and torch.equal(run(fp8_model), fp8_base)


# ------------------------------------------------------------------------------------------------
# Block offload
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_fp8", [False, True], ids=["merged", "fp8-side-path"])
def test_block_offload(model, tmp_path, lora_a, use_fp8):
    from hyvideo.lowmem.block_offload import enable_block_offload

    path = save(tmp_path, "a", lora_a)
    resident = fp8_twin(model) if use_fp8 else copy.deepcopy(model)
    stack = load(resident, (path, 0.6))
    expected = run(resident)
    stack.clear()
    streamed = fp8_twin(model) if use_fp8 else copy.deepcopy(model)
    offloader = enable_block_offload(streamed, onload_device="cpu", prefetch=1)
    base = run(streamed)
    stack = load(streamed, (path, 0.6))  # LoRA loaded while the blocks are offloaded
    assert torch.equal(run(streamed), expected)
    assert offloader.stats.onloads > 0
    if not use_fp8:  # the merged weights are in the host copies the blocks stream from
        slots = {id(s.host): s for u in offloader._units for s in u.slots}.values()
        qkv = streamed.double_blocks[0].img_attn_qkv.weight
        assert any(s.host.data_ptr() == qkv.data_ptr() for s in slots)
    stack.clear()
    assert torch.equal(run(streamed), base)
    offloader.remove()


@pytest.mark.gpu
@pytest.mark.parametrize("use_fp8", [False, True], ids=["merged", "fp8-side-path"])
def test_block_offload_streams_lora_to_the_accelerator(model, tmp_path, lora_a, use_fp8):
    from hyvideo.lowmem.block_offload import enable_block_offload

    device = torch.accelerator.current_accelerator()
    path = save(tmp_path, "a", lora_a)
    reference = fp8_twin(model) if use_fp8 else copy.deepcopy(model)
    stack = load(reference, (path, 0.6))
    expected = run(reference)
    stack.clear()
    streamed = fp8_twin(model) if use_fp8 else copy.deepcopy(model)
    offloader = enable_block_offload(streamed, onload_device=device, prefetch=1)
    stack = LoraStack(streamed, device=device)
    stack.add(read_lora(path, streamed), 0.6)
    with torch.no_grad():
        out = streamed(*(t.to(device) for t in inputs())).float().cpu()
    assert rel_err(out, expected) <= 1e-4  # TF32 / kernel differences between CPU and GPU
    blocks = [*streamed.double_blocks, *streamed.single_blocks]
    assert all(p.device.type == "cpu" for b in blocks for p in b.parameters())  # back on the host
    stack.clear()
    offloader.remove()


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_pickle_missing_and_non_safetensors_files_are_refused(model, tmp_path, lora_a):
    torch.save(lora_a, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="pickles"):
        read_lora(tmp_path / "x.pt", model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_lora(tmp_path / "absent.safetensors", model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        read_lora(tmp_path / "junk.safetensors", model)


def test_a_lora_for_another_model_lists_the_unmatched_keys(model, tmp_path):
    foreign = {f"lora_unet_down_blocks_{i}_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)
               for i in range(6)}
    with pytest.raises(ValueError, match=r"6 keys match no layer.*down_blocks_0.*\(6 in all\)"):
        read_lora(save(tmp_path, "sd", foreign), model)


def test_a_lora_for_another_size_names_the_layer(model, tmp_path):
    bigger = HYVideoDiffusionTransformer(TINY.with_updates(hidden_size=128, heads_num=4), device="meta")
    lora = random_diffusers_lora(bigger, rank=2, seed=1, select=lambda n: n == "double_blocks.1.img_attn_proj")
    with pytest.raises(ValueError, match=r"double_blocks\.1\.img_attn_proj does not fit"):
        read_lora(save(tmp_path, "big", to_original_layout(lora, bigger)), model)


def test_stack_errors(model, tmp_path, lora_a):
    weights = read_lora(save(tmp_path, "a", lora_a), model)
    stack = LoraStack(model)
    with pytest.raises(ValueError, match="finite"):
        stack.add(weights, float("nan"))
    stack.add(weights, 1.0)
    try:
        with pytest.raises(ValueError, match="already loaded"):
            stack.add(weights, 1.0)
        with pytest.raises(ValueError, match="no LoRA named 'b'"):
            stack.set_scale("b", 1.0)
    finally:
        stack.clear()
