"""Offloading: model-level moves, block prefetch offload and sequential offload give the resident outputs.

On the CPU both devices are the CPU: the onloaded copies are still separate tensors, so the tests can see
which tensor a block computes with, and the hook logic (prefetch order, release, reference counts) runs as
on an accelerator, just without side streams. The `gpu` tests measure memory and time on a real device.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyvideo.constants import DiTConfig
from hyvideo.modules import HYVideoDiffusionTransformer
from hyvideo.lowmem.offload import (
    DIT_BLOCKS,
    OFFLOAD_MODES,
    BlockOffloader,
    apply_offload,
    enable_block_offload,
    enable_sequential_offload,
    execution_device,
    has_offload_hooks,
    on_device,
)

CPU = torch.device("cpu")

# ------------------------------------------------------------------------------------------------
# Toy models
# ------------------------------------------------------------------------------------------------


class FP8Linear(nn.Module):
    """Stand-in for the fp8 linear: float8 weight parameter, per-layer scale buffer, dequantised per call."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        weight = torch.randn(n_out, n_in) / n_in**0.5
        scale = weight.abs().max() / 448
        self.weight = nn.Parameter((weight / scale).to(torch.float8_e4m3fn), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)
        self.register_buffer("fp8_scale", scale.reshape(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype) * self.fp8_scale.to(x.dtype), self.bias)


class ToyBlock(nn.Module):
    def __init__(self, d: int, fp8: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = FP8Linear(d, 2 * d) if fp8 else nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.register_buffer("gain", torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gain * self.fc2(F.gelu(self.fc1(self.norm(x))))


class ToyDiT(nn.Module):
    """Any model with ModuleLists of blocks: an input layer, two block lists, an output layer."""

    def __init__(self, d: int = 16, n_double: int = 3, n_single: int = 2, fp8: bool = False) -> None:
        super().__init__()
        self.img_in = nn.Linear(8, d)
        self.double_blocks = nn.ModuleList(ToyBlock(d, fp8) for _ in range(n_double))
        self.single_blocks = nn.ModuleList(ToyBlock(d, fp8) for _ in range(n_single))
        self.final_layer = nn.Linear(d, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.img_in(x)
        for block in (*self.double_blocks, *self.single_blocks):
            h = block(h)
        return self.final_layer(h)


def toy(fp8: bool = False) -> ToyDiT:
    return ToyDiT(fp8=fp8).eval()


TINY = DiTConfig(
    hidden_size=64, heads_num=2, rope_dim_list=(8, 12, 12), mm_double_blocks_depth=2,
    mm_single_blocks_depth=3, refiner_depth=1, text_states_dim=32, text_states_dim_2=16, in_channels=4,
    out_channels=4, guidance_embed=True,
)


def tiny_dit() -> HYVideoDiffusionTransformer:
    model = HYVideoDiffusionTransformer(TINY, attention_backend="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def tiny_dit_inputs() -> dict:
    mask = torch.ones(2, 10)
    mask[1, 6:] = 0
    return {
        "x": torch.randn(2, 4, 3, 8, 8), "t": torch.tensor([500.0, 20.0]),
        "text_states": torch.randn(2, 10, 32),
        "text_mask": mask, "text_states_2": torch.randn(2, 16), "guidance": torch.tensor([6016.0, 3504.0]),
    }


@torch.no_grad()
def run(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    return model(*args, **kwargs)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    return [*model.double_blocks, *model.single_blocks]


def block_tensors(block: nn.Module) -> list[torch.Tensor]:
    return [*block.parameters(), *block.buffers()]


def host_pointers(model: nn.Module) -> dict[int, list[int]]:
    return {id(b): [t.data_ptr() for t in block_tensors(b)] for b in blocks_of(model)}


def has_hooks(model: nn.Module) -> bool:
    return any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------
# Block and sequential offload: exact outputs, hooks exercised
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("granularity,prefetch",
                         [("block", 0), ("block", 1), ("block", 2), ("sequential", 0)])
def test_toy_outputs_equal_resident(granularity, prefetch, fp8):
    model, x = toy(fp8), torch.randn(2, 5, 8)
    expected = run(model, x)
    with BlockOffloader(model, onload_device=CPU, granularity=granularity, prefetch=prefetch) as handle:
        first, second = run(model, x), run(model, x)
        stats = handle.stats
    assert torch.equal(first, expected) and torch.equal(second, expected)
    # sequential: each block's norm, fc1, fc2 and the block itself (its `gain` buffer)
    n_units = len(blocks_of(model)) * (1 if granularity == "block" else 4)
    assert stats.onloads == stats.offloads == 2 * n_units
    assert stats.prefetches == (2 * n_units if prefetch else 0)


def unit_tensors(unit: nn.Module, granularity: str) -> list[torch.Tensor]:
    recurse = granularity == "block"
    return [*unit.parameters(recurse=recurse), *unit.buffers(recurse=recurse)]


@pytest.mark.parametrize("granularity", ["block", "sequential"])
def test_units_run_on_onloaded_copies_and_return_to_host(granularity):
    model, x = toy(fp8=True), torch.randn(2, 5, 8)
    handle = BlockOffloader(model, onload_device=CPU, granularity=granularity, prefetch=1)
    hosts = {id(u): [t.data_ptr() for t in unit_tensors(u, granularity)] for u in handle.units}
    seen = []

    def check(unit, args):
        # Registered after the offloader's hook: the unit must now hold fresh copies, not the host tensors.
        pointers = [t.data_ptr() for t in unit_tensors(unit, granularity)]
        seen.append(all(p not in hosts[id(unit)] for p in pointers))
        onloaded = sum(handle.is_onloaded(u) for u in handle.units)
        # block: the running block and the one prefetched (prefetch=1); sequential: the unit and its parents.
        seen.append(onloaded <= 2)

    for unit in handle.units:
        unit.register_forward_pre_hook(check)
    run(model, x)
    assert len(seen) == 2 * len(handle.units) and all(seen)
    assert {id(u): [t.data_ptr() for t in unit_tensors(u, granularity)] for u in handle.units} == hosts
    assert all(t.device == CPU for b in blocks_of(model) for t in block_tensors(b))
    assert not any(handle.is_onloaded(u) for u in handle.units)
    assert all(b.fc1.weight.dtype == torch.float8_e4m3fn for b in blocks_of(model))


@pytest.mark.parametrize("prefetch", [1, 2])
def test_prefetch_order_and_non_block_modules_resident(prefetch):
    model, x = toy(), torch.randn(1, 3, 8)
    handle = enable_block_offload(model, onload_device=CPU, prefetch=prefetch)
    at_entry, at_exit = [], []
    state = lambda: [handle.is_onloaded(u) for u in handle.units]  # noqa: E731
    for block in blocks_of(model):
        block.register_forward_pre_hook(lambda b, a: at_entry.append(state()))
        block.register_forward_hook(lambda b, a, o: at_exit.append(state()))
    run(model, x)
    n = len(handle.units)
    # Block i runs with blocks i .. i+prefetch-1 onloaded; when it is done it is dropped and the copy of
    # block i+prefetch starts (across the two block lists), so i+1 .. i+prefetch are onloaded.
    assert at_entry == [[i <= j < i + prefetch for j in range(n)] for i in range(n)]
    assert at_exit == [[i < j <= i + prefetch for j in range(n)] for i in range(n)]
    assert model.img_in.weight.device == model.final_layer.weight.device == CPU
    assert execution_device(model) == CPU
    assert handle.units == blocks_of(model)


def test_shared_tensor_between_blocks_is_refcounted():
    model, x = toy(), torch.randn(2, 5, 8)
    shared = model.double_blocks[0].fc2
    model.double_blocks[1].fc2 = model.single_blocks[1].fc2 = shared  # tied weights across units
    expected = run(model, x)
    with BlockOffloader(model, onload_device=CPU, prefetch=1) as handle:
        host, pointers = shared.weight.data_ptr(), []
        # Block 0 drops the shared tensor while block 1 (prefetched) still holds it: it must stay onloaded.
        model.double_blocks[1].register_forward_pre_hook(
            lambda m, a: pointers.append(m.fc2.weight.data_ptr()))
        assert torch.equal(run(model, x), expected)
        assert pointers and host not in pointers
        assert shared.weight.data_ptr() == host
        assert handle.stats.onloads == handle.stats.offloads == 5
    assert model.single_blocks[1].fc2.weight is model.double_blocks[0].fc2.weight


def test_remove_restores_plain_model():
    model, x = toy(fp8=True), torch.randn(2, 5, 8)
    expected, state = run(model, x), {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    handle = enable_block_offload(model, onload_device=CPU)
    assert has_hooks(model) and has_offload_hooks(model)
    with pytest.raises(ValueError, match="already has an offloader"):
        enable_sequential_offload(model, onload_device=CPU)
    run(model, x)
    handle.remove()
    handle.remove()  # idempotent
    assert not has_hooks(model) and not has_offload_hooks(model)
    assert [id(p) for p in model.parameters()] == params
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(run(model, x), expected)
    enable_sequential_offload(model, onload_device=CPU).remove()  # can be offloaded again


def test_recovers_after_an_exception_mid_forward():
    model, x = toy(), torch.randn(2, 5, 8)
    expected = run(model, x)
    handle = enable_block_offload(model, onload_device=CPU, prefetch=1)
    def fail(module, args):
        raise RuntimeError("boom")

    failing = model.single_blocks[0].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError):
        run(model, x)
    assert any(handle.is_onloaded(u) for u in handle.units)  # left behind by the failed forward
    failing.remove()
    assert torch.equal(run(model, x), expected)
    assert not any(handle.is_onloaded(u) for u in handle.units)


def test_bad_arguments():
    model = toy()
    with pytest.raises(ValueError, match="no nn.ModuleList 'blocks'"):
        enable_block_offload(model, onload_device=CPU, blocks=("blocks",))
    with pytest.raises(ValueError, match="granularity"):
        BlockOffloader(model, onload_device=CPU, granularity="leaf")
    with pytest.raises(ValueError, match="prefetch"):
        enable_block_offload(model, onload_device=CPU, prefetch=-1)
    with pytest.raises(ValueError, match="names of the block lists"):
        BlockOffloader(model, onload_device=CPU, blocks=None)
    assert not has_hooks(model)


def test_sequential_whole_model_streams_every_submodule():
    model, x = toy(fp8=True), torch.randn(2, 5, 8)
    expected = run(model, x)
    handle = enable_sequential_offload(model, onload_device=CPU)  # blocks=None: nothing stays resident
    owners = [m for m in model.modules() if m._parameters or m._buffers]
    assert handle.units == owners
    assert torch.equal(run(model, x), expected)
    assert handle.stats.onloads == handle.stats.offloads == len(owners)
    handle.remove()


# ------------------------------------------------------------------------------------------------
# The real (tiny) DiT
# ------------------------------------------------------------------------------------------------


def to_fp8_blocks(model: nn.Module) -> nn.Module:
    """Convert the block linears to the real FP8Linear (float8 weight + `fp8_scale` buffer) like --use-fp8."""
    from hyvideo.modules.fp8_optimization import convert_fp8_linear, fp8_layer_names, fp8_scale_for

    scales = {name: fp8_scale_for(model.get_submodule(name).weight) for name in fp8_layer_names(model)}
    convert_fp8_linear(model, scales, compute_dtype=torch.float32)
    return model


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("granularity,prefetch", [("block", 1), ("block", 3), ("sequential", 0)])
def test_tiny_dit_outputs_equal_resident(granularity, prefetch, fp8):
    model, inputs = tiny_dit(), tiny_dit_inputs()
    if fp8:
        to_fp8_blocks(model)
        fp8_weights = [p for p in model.parameters() if p.dtype == torch.float8_e4m3fn]
        assert len(fp8_weights) == 2 * 10 + 3 * 3  # 10 linears per double block, 3 per single block
    expected = run(model, **inputs)
    with BlockOffloader(model, onload_device=CPU, blocks=DIT_BLOCKS, granularity=granularity,
                        prefetch=prefetch) as handle:
        hosts = host_pointers(model)
        out = run(model, **inputs)
        assert host_pointers(model) == hosts
        assert handle.stats.onloads == handle.stats.offloads
        if granularity == "block":
            assert handle.stats.onloads == TINY.mm_double_blocks_depth + TINY.mm_single_blocks_depth
    assert torch.equal(out, expected)
    assert not has_hooks(model)


# ------------------------------------------------------------------------------------------------
# Model-level moves and the pipeline plan
# ------------------------------------------------------------------------------------------------


def test_on_device_moves_in_and_restores_without_copy_back():
    model = toy(fp8=True)
    before = [(t.data_ptr(), t.device) for t in (*model.parameters(), *model.buffers())]
    # "meta" stands in for an accelerator on a CPU-only machine: a real move, but nothing to copy back.
    with on_device(model, "meta") as moved:
        assert moved is model
        assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}
    assert [(t.data_ptr(), t.device) for t in (*model.parameters(), *model.buffers())] == before
    with on_device(model, "meta", enabled=False):
        assert next(model.parameters()).device == CPU
    n_params = len(list(model.parameters()))
    with on_device(model, CPU, offload_device="meta"):  # already there: stays there, nothing moves
        assert [t.data_ptr() for t in model.parameters()] == [p for p, _ in before[:n_params]]
    assert next(model.parameters()).device == CPU
    with on_device(None, "meta") as nothing:
        assert nothing is None


def test_on_device_refuses_a_hooked_model():
    model = toy()
    handle = enable_block_offload(model, onload_device=CPU)
    with pytest.raises(ValueError, match="remove the offloader"):
        with on_device(model, "meta"):
            pass
    handle.remove()


def toy_components() -> dict[str, nn.Module]:
    return {"text_encoder": nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).eval(),
            "transformer": toy(), "vae": nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()}


def toy_pipeline(plan, components, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        with plan.stage("text_encoder"):
            cond = components["text_encoder"](x)
        with plan.stage("transformer"):
            latents = components["transformer"](x + cond)
        with plan.stage("vae"):
            return components["vae"](latents)


@pytest.mark.parametrize("mode", OFFLOAD_MODES)
def test_apply_offload_modes_give_resident_outputs(mode):
    components, x = toy_components(), torch.randn(2, 5, 8)
    resident = apply_offload(components, mode="none", device=CPU)
    expected = toy_pipeline(resident, components, x)
    plan = apply_offload(components, mode=mode, device=CPU)
    assert torch.equal(toy_pipeline(plan, components, x), expected)
    hooked = {name for name, module in components.items() if has_offload_hooks(module)}
    assert hooked == {"none": set(), "model": set(), "block": {"transformer"},
                      "sequential": {"text_encoder", "vae"}}[mode]
    assert plan.staged == {"model": {"text_encoder", "transformer", "vae"},
                           "block": {"text_encoder", "vae"}}.get(mode, frozenset())
    assert plan.execution_device("vae") == CPU
    plan.remove()
    assert not any(has_hooks(m) for m in components.values())


def test_apply_offload_bad_input():
    components = toy_components()
    with pytest.raises(ValueError, match="offload mode"):
        apply_offload(components, mode="cpu", device=CPU)
    with pytest.raises(ValueError, match="needs the DiT"):
        apply_offload({"vae": components["vae"]}, mode="block", device=CPU)
    plan = apply_offload(components, mode="model", device=CPU)
    with pytest.raises(ValueError, match="unknown components"):
        with plan.stage("text_encoder_3"):
            pass


# ------------------------------------------------------------------------------------------------
# GPU: memory and time (skipped without CUDA)
# ------------------------------------------------------------------------------------------------

MID = DiTConfig(
    hidden_size=1024, heads_num=8, rope_dim_list=(16, 56, 56), mm_double_blocks_depth=4,
    mm_single_blocks_depth=8, text_states_dim=256, text_states_dim_2=64, guidance_embed=True,
)


def _mid_inputs(device, dtype):
    return {"x": torch.randn(1, 16, 9, 48, 64, device=device, dtype=dtype),
            "t": torch.tensor([500.0], device=device),
            "text_states": torch.randn(1, 64, 256, device=device, dtype=dtype),
            "text_mask": torch.ones(1, 64, device=device),
            "text_states_2": torch.randn(1, 64, device=device, dtype=dtype),
            "guidance": torch.tensor([6016.0], device=device)}


def _measure(model, inputs, device) -> tuple[torch.Tensor, float, int]:
    with torch.autocast(device.type, dtype=torch.bfloat16):  # as the pipeline runs the DiT
        run(model, **inputs)  # warm-up
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        out = run(model, **inputs)
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - started, torch.cuda.max_memory_allocated(device)


@pytest.mark.gpu
def test_gpu_block_offload_memory_and_time():
    device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    model = HYVideoDiffusionTransformer(MID, dtype=dtype).eval()
    inputs = _mid_inputs(device, dtype)
    block_bytes = max(sum(t.numel() * t.element_size() for t in block_tensors(b)) for b in blocks_of(model))
    all_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    results = {}
    for name in ("resident", "block", "sequential"):
        if name == "resident":
            model.to(device)
            results[name] = _measure(model, inputs, device)
            model.to("cpu")
            torch.cuda.empty_cache()
            continue
        with BlockOffloader(model, onload_device=device, granularity=name, prefetch=1):
            results[name] = _measure(model, inputs, device)
    for name, (out, seconds, peak) in results.items():
        print(f"{name:>10}: {seconds * 1e3:8.1f} ms  peak {peak / 2**20:8.1f} MiB")
    assert torch.equal(results["block"][0], results["resident"][0])
    assert torch.equal(results["sequential"][0], results["resident"][0])
    saved = results["resident"][2] - results["block"][2]
    assert saved > all_bytes - 4 * block_bytes  # only ~2 blocks (+ one in flight) of weights on the device


@pytest.mark.gpu
def test_gpu_on_device_frees_memory():
    device = torch.device("cuda", torch.cuda.current_device())
    model = ToyDiT(d=1024)
    baseline = torch.cuda.memory_allocated(device)
    with on_device(model, device):
        assert next(model.parameters()).device == device
        assert torch.cuda.memory_allocated(device) > baseline
    assert next(model.parameters()).device == CPU
    assert torch.cuda.memory_allocated(device) == baseline


@pytest.mark.gpu
def test_gpu_pinned_host_copies():
    device = torch.device("cuda", torch.cuda.current_device())
    model = toy(fp8=True)
    with enable_block_offload(model, onload_device=device):
        assert all(t.is_pinned() for b in blocks_of(model) for t in block_tensors(b))
        assert model.img_in.weight.device == device
        out = run(model, torch.randn(2, 5, 8, device=device))
    assert out.device == device


@pytest.mark.parametrize("granularity", ["block", "sequential"])
def test_hf_text_encoder_under_offload(granularity):
    # The text encoders are transformers models: hooks must cope with keyword inputs, rotary buffers and
    # modules (embedding, final norm) used outside the decoder layers.
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaModel(config).eval()
    ids, mask = torch.randint(0, 64, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": True}
    expected = run(model, **kwargs).hidden_states
    blocks = ("layers",) if granularity == "block" else None
    with BlockOffloader(model, onload_device=CPU, blocks=blocks, granularity=granularity) as handle:
        out = run(model, **kwargs).hidden_states
        assert handle.stats.onloads == handle.stats.offloads > 0
    assert all(torch.equal(a, b) for a, b in zip(out, expected, strict=True))
