"""--compile: regional torch.compile of the DiT blocks equals eager, has no graph break, composes, logs sizes.

Compile time on 2 CPU cores dominates this file, so inductor (the real backend, C++ kernels) runs twice: the
fp32 DiT parity test and the CLI video test. The structural checks use the "eager" backend (dynamo capture
only: a graph break under fullgraph=True raises just the same) and the composition checks "aot_eager"
(dynamo + AOTAutograd functionalisation, which is what inductor consumes), both seconds.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import sample_video
from hyvideo.lowmem.block_offload import enable_block_offload
from hyvideo.modules import HYVideoDiffusionTransformer
from hyvideo.modules.compile import compile_dit_blocks, is_compiled, uncompile_dit_blocks
from hyvideo.modules.fp8_gemm import enable_fp8_gemm
from hyvideo.modules.fp8_optimization import convert_fp8_linear, fp8_layer_names, fp8_scale_for
from hyvideo.testing.tiny import write_tiny_checkpoints
from hyvideo.utils.file_utils import load_latents
from tests.helpers import TINY_DIT_TEST, rel_err
from tests.parallel_workers.launch import REPO, tail, torchrun

SMALL = ["--video-size", "64", "96", "--video-length", "5", "--infer-steps", "2", "--precision", "fp32",
         "--vae-precision", "fp32", "--text-encoder-precision", "fp32", "--text-encoder-precision-2", "fp32"]


def tiny_model(backend: str = "sdpa") -> HYVideoDiffusionTransformer:
    model = HYVideoDiffusionTransformer(TINY_DIT_TEST, attention_backend=backend).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def tiny_inputs(frames: int = 3, valid: tuple[int, int] = (12, 7)) -> dict:
    mask = torch.zeros(2, 12)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
    return {"x": torch.randn(2, 4, frames, 8, 8), "t": torch.tensor([500.0, 20.0]),
            "text_states": torch.randn(2, 12, 32), "text_mask": mask, "text_states_2": torch.randn(2, 16),
            "guidance": torch.tensor([6016.0, 3504.0])}


def forward(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def graph_count() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# ------------------------------------------------------------------------------------------------
# The compiled region
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "vanilla"])
def test_one_graph_per_block_class_no_graph_break_and_one_recompile_per_size(backend, caplog):
    model, inputs = tiny_model(backend), tiny_inputs()
    expected = forward(model, inputs)
    calls = []
    model.double_blocks[0].register_forward_pre_hook(lambda mod, args: calls.append("pre"))
    compiled = compile_dit_blocks(model, backend="eager")
    assert compiled.fullgraph  # a graph break inside a block would raise here, not pass silently
    with caplog.at_level(logging.INFO, logger="hyvideo.modules.compile"):
        assert torch.equal(forward(model, inputs), expected)
        # 1 refiner + 2 double + 2 single blocks share 3 graphs: one compiled code object per class.
        assert graph_count() == 3 and len(compiled.blocks) == 5
        forward(model, inputs)
        assert graph_count() == 3 and caplog.text.count("torch.compile: compiling") == 3
        assert "recompiling" not in caplog.text
        assert calls == ["pre", "pre"]  # the block's own hook runs (outside the graph) on every call
        if backend == "vanilla":
            return
        bigger = tiny_inputs(frames=5)  # more image tokens: the two MM block classes recompile, once
        forward(model, bigger)
        forward(model, bigger)
    assert caplog.text.count("recompiling (new video size or text length) MMDoubleStreamBlock") == 1
    assert caplog.text.count("recompiling (new video size or text length) MMSingleStreamBlock") == 1
    assert graph_count() == 5


@pytest.mark.slow  # one inductor compile of the 3 block classes: ~30 s on 2 idle cores, cold cache
def test_inductor_compiled_dit_matches_eager_fp32():
    model, inputs = tiny_model(), tiny_inputs()
    expected = forward(model, inputs)
    compile_dit_blocks(model)
    assert rel_err(forward(model, inputs), expected) <= 1e-5


def test_compile_refusals_and_uncompile():
    model = tiny_model()
    compile_dit_blocks(model, backend="eager")  # lazy: nothing is traced before the first call
    assert is_compiled(model)
    with pytest.raises(ValueError, match="already compiled"):
        compile_dit_blocks(model, backend="eager")
    uncompile_dit_blocks(model)
    assert not is_compiled(model) and "forward" not in vars(model.double_blocks[0])
    model.single_blocks[0].linear1.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"submodule 'linear1' has forward hooks"):
        compile_dit_blocks(model, backend="eager")
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compile_dit_blocks(tiny_model(), mode="reduce-overhead")


# ------------------------------------------------------------------------------------------------
# Composition: fp8 weights, fp8 GEMM, block offload, sequence parallelism
# ------------------------------------------------------------------------------------------------


def fp8_model() -> HYVideoDiffusionTransformer:
    model = tiny_model()
    scales = {name: fp8_scale_for(model.get_submodule(name).weight) for name in fp8_layer_names(model)}
    convert_fp8_linear(model, scales, compute_dtype=torch.float32)
    return model


@pytest.mark.parametrize("variant", ["fp8_block_offload", "fp8_gemm", "fp8_gemm_chunked", "chunked"])
def test_compile_composes_with_fp8_and_block_offload(variant):
    torch.manual_seed(3)
    model, inputs = (tiny_model() if variant == "chunked" else fp8_model()), tiny_inputs()
    if variant.startswith("fp8_gemm"):
        enable_fp8_gemm(model, "cpu")
    if variant.endswith("chunked"):  # real sizes (> 8192 tokens) chunk automatically: the GPU run found
        for block in [*model.double_blocks, *model.single_blocks]:  # a dynamo failure only this path had
            block.chunk_tokens = 40
    offloader = enable_block_offload(model, onload_device="cpu") if variant == "fp8_block_offload" else None
    expected = forward(model, inputs)
    compile_dit_blocks(model, backend="aot_eager")  # fullgraph: FP8Linear and _scaled_mm trace whole
    assert rel_err(forward(model, inputs), expected) <= 1e-6
    if offloader is not None:  # the hooks ran around every compiled block, twice (eager + compiled run)
        assert offloader.stats.onloads == 2 * len(offloader.units)
        assert not any(offloader.is_onloaded(b) for b in offloader.units)


@pytest.mark.multigpu
def test_compiled_sequence_parallel_dit_under_torchrun(tmp_path):
    out = tmp_path / "compile.pt"
    proc, _ = torchrun(2, REPO / "tests" / "parallel_workers" / "compile_worker.py", str(out), "aot_eager")
    assert proc.returncode == 0, tail(proc)
    result = torch.load(out, weights_only=True)
    # The Ulysses collectives run eagerly between graphs, so fullgraph is off and the result is exact.
    assert not result["fullgraph"] and result["unique_graphs"] >= 3
    assert rel_err(result["compiled"], result["eager"]) <= 1e-6


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"))


@pytest.mark.slow  # two CLI runs, one with an inductor compile: ~40 s on 2 idle cores, cold cache
def test_cli_compile_gives_the_eager_video(tiny_tree, tmp_path, capsys):
    latents = []
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        code = sample_video.main(["--model-base", str(tiny_tree), "--prompt", "a boat", "--seed", "5",
                                  "--save-latents", "--save-path", str(out), *SMALL, *extra])
        assert code == 0, capsys.readouterr().err
        (path,) = sorted(out.glob("*.safetensors"))
        latents.append(load_latents(path)[0])
    assert rel_err(latents[1], latents[0]) <= 1e-5


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--fp8-gemm"], "--fp8-gemm multiplies the fp8 weights directly: add --use-fp8"),
        (["--compile", "--compile-mode", "reduce-overhead"], "--compile-mode"),
        (["--attn-backend", "fa3"], "--attn-backend fa3: needs flash-attn 3"),
        (["--attn-backend", "sage"], "--attn-backend sage: needs SageAttention (pip install sageattention)"),
    ],
    ids=["fp8-gemm-without-fp8", "unknown-compile-mode", "fa3-missing", "sage-missing"],
)
def test_bad_combinations_exit_2_with_one_line(tiny_tree, tmp_path, capsys, extra, needle):
    if "--attn-backend" in extra:
        module = {"fa3": "flash_attn_interface", "sage": "sageattention"}[extra[1]]
        if importlib.util.find_spec(module) is not None:
            pytest.skip(f"{module} is installed here")
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        sample_video.main(["--model-base", str(tiny_tree), "--prompt", "x", "--save-path", str(out), *SMALL,
                           *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_compile_flags_reach_the_config():
    from hyvideo.config import parse_args

    cfg = parse_args(["--compile", "--compile-mode", "max-autotune-no-cudagraphs", "--use-fp8", "--fp8-gemm"])
    assert (cfg.model.compile, cfg.model.compile_mode, cfg.model.fp8_gemm) == (
        True, "max-autotune-no-cudagraphs", True)
    default = parse_args([]).model
    assert (default.compile, default.compile_mode, default.fp8_gemm) == (False, "default", False)


def test_compile_composes_with_step_caching():
    from hyvideo.diffusion.cache import CacheConfig, StepCache

    model, inputs = tiny_model(), tiny_inputs()

    def three_steps() -> tuple[list[torch.Tensor], list[int]]:
        # fbcache runs the first double block alone, then the rest or nothing: both call patterns compiled.
        cache = StepCache.create(CacheConfig("fbcache", threshold=0.5), num_steps=3, height=64, width=64)
        outputs = []
        for step, t in enumerate((500.0, 499.0, 300.0)):
            cache.begin_step(step)
            with torch.no_grad():
                outputs.append(model(**{**inputs, "t": torch.tensor([t, t])}, step_cache=cache))
        return outputs, list(cache.computed_steps)

    expected, expected_steps = three_steps()
    assert expected_steps == [0, 2]  # step 1 reuses: the case is a real cache decision
    compile_dit_blocks(model, backend="aot_eager")
    outputs, steps = three_steps()
    assert steps == expected_steps
    assert all(rel_err(o, e) <= 1e-6 for o, e in zip(outputs, expected, strict=True))
