"""Regional `torch.compile` of the DiT: each repeated block's own forward, one compiled code per block class.

`compile_dit_blocks(model)` is called once after the model is loaded (and after any offload is attached). It
compiles `MMDoubleStreamBlock.forward`, `MMSingleStreamBlock.forward` and
`IndividualTokenRefinerBlock.forward` once each, and points every block of that class at the shared compiled
function: 20 + 40 + 2 blocks, three graphs, compile time in seconds rather than the minutes a whole-model
compile takes. The embedders, the loop over the blocks and the final layer stay eager.

Why the instance's `forward` and not `nn.Module.compile()`: the latter compiles `_call_impl`, i.e. the module's
hooks too. Block offload (hyvideo/lowmem/block_offload.py) swaps each block's weights in its forward pre-hook
and out in its forward hook; those must run eagerly, around the compiled graph. Replacing only the block's
`forward` keeps every hook outside; `uncompile_dit_blocks` removes the replacement again.

Graphs:
* No graph break inside a block with the in-process attention backends "sdpa" and "vanilla": compiled with
  `fullgraph=True`, so a break is an error, not a silent slowdown (tests/test_compile.py).
* Under sequence parallelism the blocks' attention is the collective Ulysses x ring call, which runs eagerly
  (`SequenceParallelAttention.__call__` is excluded from compilation): each block becomes two graphs, before
  and after attention, and the collectives never enter a graph.
* External kernels ("flash", "fa3", "sage") are compiled without `fullgraph`: a kernel that dynamo cannot trace
  costs a graph break instead of an error.

Shapes are static (`dynamic=False`): a new video size or prompt length compiles each block class once more,
which is logged ("compiling ... for new input shapes"); inductor's on-disk cache (default on) makes the same
shapes fast again in a later process. Past dynamo's recompile limit (8 shapes per class) blocks run eagerly,
which is also logged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .models import MMDoubleStreamBlock, MMSingleStreamBlock
from .token_refiner import IndividualTokenRefinerBlock

logger = logging.getLogger(__name__)

COMPILE_MODES: tuple[str, ...] = ("default", "max-autotune-no-cudagraphs")
# Where the repeated blocks live in HYVideoDiffusionTransformer (module names: the checkpoint contract).
BLOCK_LISTS: tuple[str, ...] = ("double_blocks", "single_blocks", "txt_in.individual_token_refiner.blocks")
COMPILED_CLASSES: tuple[type[nn.Module], ...] = (
    MMDoubleStreamBlock, MMSingleStreamBlock, IndividualTokenRefinerBlock,
)
# Attention backends traced by dynamo without a graph break (checked with fullgraph=True).
FULLGRAPH_BACKENDS: tuple[str, ...] = ("sdpa", "vanilla")


def _shape_key(args: tuple, kwargs: dict) -> tuple:
    """The shapes (and None-ness) of a block call's tensor inputs: what a static-shape graph depends on."""
    def describe(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        if isinstance(value, (tuple, list)):
            return tuple(describe(v) for v in value)
        return None if value is None else type(value).__name__

    return describe(args), tuple(sorted((k, describe(v)) for k, v in kwargs.items()))


class SharedCompiledForward:
    """One class's `forward`, compiled once and called by every block of that class (logs new shapes)."""

    def __init__(self, block_class: type[nn.Module], *, mode: str, backend: str, fullgraph: bool) -> None:
        self.name = block_class.__name__
        options = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}
        self.compiled = torch.compile(
            block_class.forward, backend=backend, fullgraph=fullgraph, dynamic=False, **options
        )
        self.shapes_seen: set[tuple] = set()

    def __call__(self, block: nn.Module, *args, **kwargs):
        key = _shape_key(args, kwargs)
        if key not in self.shapes_seen:  # runs eagerly, outside the graph: a set lookup per block call
            self.shapes_seen.add(key)
            limit = torch._dynamo.config.recompile_limit
            if len(self.shapes_seen) > limit:
                logger.warning("torch.compile: %s has seen %d input shapes, over dynamo's recompile limit "
                               "%d; blocks with new shapes run eagerly", self.name, len(self.shapes_seen), limit)
            else:
                verb = "compiling" if len(self.shapes_seen) == 1 else "recompiling (new video size or text length)"
                logger.info("torch.compile: %s %s for input shapes %s", verb, self.name, key[0])
        return self.compiled(block, *args, **kwargs)


@dataclass(frozen=True)
class CompiledBlocks:
    """What `compile_dit_blocks` did: the shared compiled forwards and the blocks pointed at them."""

    forwards: dict[str, SharedCompiledForward]
    blocks: tuple[nn.Module, ...]
    fullgraph: bool


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the DiT's block lists that are compiled, in execution order (refiner first)."""
    order = (BLOCK_LISTS[2], *BLOCK_LISTS[:2])
    found = []
    for name in order:
        try:
            container = model.get_submodule(name)
        except AttributeError:
            continue
        found.extend(b for b in container if isinstance(b, COMPILED_CLASSES))
    return found


def _check_no_inner_hooks(blocks: Iterable[nn.Module]) -> None:
    """Hooks on a block's submodules would be traced into its graph: refuse them (a block's own are fine)."""
    for block in blocks:
        for name, sub in block.named_modules():
            if sub is not block and (sub._forward_pre_hooks or sub._forward_hooks):
                raise ValueError(
                    f"cannot compile {type(block).__name__}: its submodule {name!r} has forward hooks, which "
                    "would run inside the compiled graph (sequential offload of the DiT?); use --offload-mode "
                    "block or none with --compile"
                )


def is_compiled(model: nn.Module) -> bool:
    """Whether `compile_dit_blocks` has been applied to `model`'s blocks."""
    return any("forward" in vars(b) for b in repeated_blocks(model))


def compile_dit_blocks(
    model: nn.Module,
    *,
    mode: str = "default",
    backend: str = "inductor",
    fullgraph: bool | None = None,
) -> CompiledBlocks:
    """Compile the repeated blocks of a HYVideoDiffusionTransformer in place (lazily, at their first call).

    Args:
        model: the loaded DiT (fp8 layers, fp8 GEMM layers, block offload and sequence parallelism allowed).
        mode: "default" or "max-autotune-no-cudagraphs" (inductor only).
        backend: the torch.compile backend; "inductor" for speed ("eager"/"aot_eager" trace only: tests).
        fullgraph: forbid graph breaks inside a block; default True for the "sdpa"/"vanilla" attention
            backends without sequence parallelism, else False (see the module docstring).
    Returns:
        CompiledBlocks, for inspection; `uncompile_dit_blocks(model)` undoes it.
    Raises:
        ValueError: unknown mode, already compiled, no blocks, or hooks inside a block.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if is_compiled(model):
        raise ValueError("the DiT blocks are already compiled: call uncompile_dit_blocks first")
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no blocks to compile (looked in {BLOCK_LISTS})")
    _check_no_inner_hooks(blocks)
    if fullgraph is None:
        in_process = getattr(model, "attention_backend", None) in FULLGRAPH_BACKENDS
        fullgraph = in_process and getattr(model, "parallel", None) is None
    forwards: dict[str, SharedCompiledForward] = {}
    for block in blocks:
        cls = type(block)
        if cls.__name__ not in forwards:
            forwards[cls.__name__] = SharedCompiledForward(cls, mode=mode, backend=backend, fullgraph=fullgraph)
        # An instance attribute: nn.Module._call_impl calls `self.forward` between the hooks.
        block.forward = functools.partial(forwards[cls.__name__], block)
    logger.info("torch.compile (%s, mode %s, fullgraph %s) of %d blocks in %d classes: %s", backend, mode,
                fullgraph, len(blocks), len(forwards), ", ".join(forwards))
    return CompiledBlocks(forwards=forwards, blocks=tuple(blocks), fullgraph=fullgraph)


def uncompile_dit_blocks(model: nn.Module) -> None:
    """Point every block back at its class's eager forward."""
    for block in repeated_blocks(model):
        vars(block).pop("forward", None)
