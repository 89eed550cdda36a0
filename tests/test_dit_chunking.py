"""Token-chunked DiT blocks and final layer (hyvideo/lowmem/chunking.py): same maths as unchunked.

Tolerance: chunking changes only the number of rows of each GEMM (and, for the single block's linear2, splits
its reduction into the attention part and the MLP part), which reorders float32 sums; 1e-6 relative is a
few float32 roundings over the whole DiT, far below any real difference (a wrong slice or a missed RoPE
row gives errors of order 1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hyvideo.config import parse_args
from hyvideo.lowmem.block_offload import enable_block_offload
from hyvideo.lowmem.chunking import AUTO_CHUNK_TOKENS, resolve_chunk_tokens, token_ranges
from hyvideo.modules.fp8_optimization import FP8Linear, convert_fp8_linear, quantize_state_dict
from tests.helpers import TINY_DIT_TEST, rel_err
from tests.test_dit_model import tiny_inputs, tiny_model

TOL = 1e-6
# A mid-size config: 4 heads of 32 dims, 4x MLP, several blocks of each kind.
MID = TINY_DIT_TEST.with_updates(hidden_size=128, heads_num=4, rope_dim_list=(8, 12, 12),
                                 mm_double_blocks_depth=3, mm_single_blocks_depth=3)


def _forward(model, inputs, chunk):
    model.set_chunk_tokens(chunk)
    with torch.no_grad():
        return model(**inputs)


def _inputs(latent_thw, seed=0):
    torch.manual_seed(seed)
    inputs = tiny_inputs()
    inputs["x"] = torch.randn(2, 4, *latent_thw)
    return inputs


def test_resolve_chunk_tokens():
    assert resolve_chunk_tokens(0, 5000) == 5000  # off
    assert resolve_chunk_tokens(None, 5000) == 5000  # fits one automatic chunk
    assert resolve_chunk_tokens(100, 5000) == 100
    # 720p x 129 frames: 15 even chunks instead of 14 full ones and a remainder
    assert resolve_chunk_tokens(None, 118_800) == 7920 and 7920 <= AUTO_CHUNK_TOKENS
    assert token_ranges(3, 10, 4) == [slice(3, 7), slice(7, 10)]
    with pytest.raises(ValueError, match="positive token count"):
        resolve_chunk_tokens(-1, 10)


@pytest.mark.parametrize("config,latent_thw,chunks", [
    (TINY_DIT_TEST, (3, 8, 8), (7, 16, 47)),  # 48 image tokens; 47 leaves a 1-token chunk
    (TINY_DIT_TEST, (3, 10, 14), (10, 33)),  # 105 tokens: not divisible by either
    (MID, (5, 12, 12), (25, 64, 179)),  # 180 tokens
])
def test_chunked_equals_unchunked(config, latent_thw, chunks):
    model = tiny_model(config)
    inputs = _inputs(latent_thw)
    reference = _forward(model, inputs, 0)
    for chunk in chunks:
        assert rel_err(_forward(model, inputs, chunk), reference) <= TOL, chunk
    # A sequence that fits one chunk runs the unchunked code: bit-identical.
    tokens = latent_thw[0] * latent_thw[1] * latent_thw[2] // 4 + 12
    assert torch.equal(_forward(model, inputs, tokens), reference)
    assert torch.equal(_forward(model, inputs, None), reference)  # automatic: small sequence, one chunk


def test_chunked_matches_with_grad_and_batch_of_one():
    model = tiny_model()
    inputs = {k: v[:1] for k, v in _inputs((3, 10, 14)).items()}
    model.set_chunk_tokens(0)
    reference = model(**inputs)
    model.set_chunk_tokens(9)
    out = model(**inputs)  # grad enabled: no in-place reuse of buffers, autograd still works
    assert rel_err(out.detach(), reference.detach()) <= TOL
    out.sum().backward()
    assert model.single_blocks[0].linear2.weight.grad is not None


class _WrappedLinear(nn.Module):
    """A linear wrapper the chunked code cannot see through (like an adapter): must be called as a module."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_unknown_linear2_wrapper_is_called_per_chunk():
    model = tiny_model()
    inputs = _inputs((3, 10, 14))
    reference = _forward(model, inputs, 0)
    for block in model.single_blocks:
        block.linear2 = _WrappedLinear(block.linear2)
    assert rel_err(_forward(model, inputs, 20), reference) <= TOL
    assert model.single_blocks[0].linear2.calls == 6 + 1  # 105 image tokens in chunks of 20, 12 text


def test_fp8_blocks_chunked():
    model = tiny_model()
    state, scales = quantize_state_dict(model.state_dict())
    convert_fp8_linear(model, scales, compute_dtype=torch.float32)
    assert isinstance(model.single_blocks[0].linear2, FP8Linear)
    inputs = _inputs((3, 10, 14))
    assert rel_err(_forward(model, inputs, 16), _forward(model, inputs, 0)) <= TOL


def test_hooked_linears_are_called_not_bypassed():
    # The fp8 LoRA side path is a forward hook on each FP8Linear (hyvideo/modules/lora.py): chunking must
    # call hooked layers, not multiply by their weight directly, or the LoRA would silently vanish.
    model = tiny_model()
    state, scales = quantize_state_dict(model.state_dict())
    convert_fp8_linear(model, scales, compute_dtype=torch.float32)
    inputs = _inputs((3, 10, 14))
    plain = _forward(model, inputs, 0)
    for module in model.modules():
        if isinstance(module, FP8Linear):
            module.register_forward_hook(lambda _m, _args, out: out + 0.01)
    hooked = _forward(model, inputs, 0)
    assert not rel_err(hooked, plain) <= 1e-3  # the hooks change the output
    assert rel_err(_forward(model, inputs, 16), hooked) <= TOL


def test_block_offload_with_chunks():
    model = tiny_model()
    inputs = _inputs((3, 8, 8))
    reference = _forward(model, inputs, 0)
    offloader = enable_block_offload(model, onload_device="cpu", pin_memory=False)
    try:
        assert rel_err(_forward(model, inputs, 11), reference) <= TOL
    finally:
        offloader.remove()


def test_cli_flag():
    assert parse_args(["--prompt", "x"]).model.dit_chunk_tokens is None
    assert parse_args(["--prompt", "x", "--dit-chunk-tokens", "0"]).model.dit_chunk_tokens == 0
    with pytest.raises(SystemExit) as exc:
        parse_args(["--prompt", "x", "--dit-chunk-tokens", "-5"])
    assert exc.value.code == 2
