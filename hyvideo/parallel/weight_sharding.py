"""--shard-weights: the DiT's weights sharded over every rank with PyTorch FSDP2.

Every double / single block is its own `fully_shard` unit over all ranks, and the model's remaining weights
(embedders, token refiner, final layer) form the root unit. Each rank keeps 1/N of every parameter (dim-0
shards). Just before a block runs, FSDP2 all-gathers its parameters; the next block's all-gather is issued at
the same time (explicit forward prefetch), and after the block's forward the gathered copy is freed (reshard
after forward). So a rank holds its shards plus at most two whole blocks; the sequence-parallel activations
are unchanged. Without --cfg-parallel all ranks are the sequence-parallel group. With --cfg-parallel they are
its two copies, which run the same blocks in lockstep (one DiT forward per step each), so sharding over all
of them halves every rank's weights once more than sharding within a branch would (and a 1-rank branch, 2
processes, could not shard at all).

fp8 (--use-fp8) composes: the fp8 weights are ordinary parameters of `FP8Linear`, sharded and gathered as
their 1-byte storage, so the all-gather volume halves too. The per-layer scales are 0-d buffers (4 bytes each,
320 at full size); FSDP2 does not shard buffers, so every rank keeps all of them.

Loading never materialises the whole model on a rank: the model is built on the meta device, sharded there,
given empty local shards on the compute device, and each rank copies only its rows out of the memory-mapped
checkpoint (`load_dit_state_dict`: `torch.load(mmap=True, weights_only=True)`), so the pages of the other ranks' rows are never read by it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from hyvideo.constants import DiTConfig
from hyvideo.parallel.groups import SequenceParallelState

logger = logging.getLogger(__name__)


def shard_mesh(state: SequenceParallelState) -> DeviceMesh:
    """A 1-D device mesh over the ranks of `state` (its group, or every rank)."""
    group = state.group if state.group is not None else dist.group.WORLD
    return DeviceMesh.from_group(group, state.device.type)


def dit_blocks(model: nn.Module) -> list[nn.Module]:
    """The DiT's blocks in execution order: double-stream, then single-stream."""
    return [*model.double_blocks, *model.single_blocks]


def shard_dit(model: nn.Module, state: SequenceParallelState) -> nn.Module:
    """Apply FSDP2 to the DiT in place: one unit per block plus the root; prefetch the next block.

    Works on a meta-device model (then give it storage with `to_empty`) or a materialised one (its
    parameters are then replaced by this rank's shards). Returns `model` (now also an `FSDPModule`).
    """
    mesh = shard_mesh(state)
    blocks = dit_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    # While block i computes, block i+1's all-gather is already under way (the root starts block 0's).
    model.set_modules_to_forward_prefetch(blocks[:1])
    for current, following in zip(blocks, blocks[1:]):
        current.set_modules_to_forward_prefetch([following])
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local_weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers this rank holds (its shards when sharded, all of them otherwise)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def gathered_bytes_per_forward(model: nn.Module) -> int:
    """Parameter bytes one rank receives from the others in one sharded forward (every unit gathered once)."""
    received = 0
    for param in model.parameters():
        if hasattr(param, "to_local"):
            local = param.to_local()
            received += (param.numel() - local.numel()) * param.element_size()
    return received


def _local_rows(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's dim-0 shard of `full` as FSDP2 cuts it (torch.chunk over the mesh; last ranks may be empty)."""
    mesh = param.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    chunks = torch.chunk(full, world, dim=0)
    rows = chunks[rank] if rank < len(chunks) else full[:0]
    local = param.to_local()
    if tuple(rows.shape) != tuple(local.shape):
        raise RuntimeError(f"FSDP2 shard of shape {tuple(local.shape)}, but torch.chunk gives "
                           f"{tuple(rows.shape)}: this torch cuts shards differently")
    return rows


def fill_shards(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy each parameter's rows for this rank out of the full (memory-mapped) `state_dict`.

    Each value is cast to the parameter's dtype (fp8 stays fp8, FinalLayer.linear float32) one shard at a
    time, so at most one shard's temporary exists beside the model.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = state_dict[name]
            if hasattr(param, "to_local"):
                param.to_local().copy_(_local_rows(full, param).to(param.dtype))
            else:
                param.copy_(full.to(param.dtype))


def load_sharded_dit(
    config: DiTConfig,
    path: str | os.PathLike,
    state: SequenceParallelState,
    *,
    use_fp8: bool = False,
    load_key: str = "module",
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str | None = None,
    attention_backend: str = "auto",
) -> nn.Module:
    """Build the DiT on the meta device, shard it over `state`'s ranks and load only this rank's shards.

    Args:
        config, path, load_key, dtype, attention_backend: as for `hyvideo.modules.load_dit`.
        state: the sequence-parallel group to shard over (every rank of it calls this).
        use_fp8: `path` is an fp8 checkpoint with its scale map (as `load_fp8_dit`).
        device: where the shards live (default: the state's device).
    Returns:
        The sharded DiT in eval mode, numerically the same model as the unsharded load.
    """
    from hyvideo.modules.fp8_optimization import convert_fp8_linear, fp8_layer_names, read_or_quantize_fp8
    from hyvideo.modules.loading import check_dit_state_dict, load_dit_state_dict
    from hyvideo.modules.models import HYVideoDiffusionTransformer

    device = torch.device(device) if device is not None else state.device
    model = HYVideoDiffusionTransformer(config, dtype=dtype, device="meta",
                                        attention_backend=attention_backend)
    if use_fp8:
        # An fp8 file pair is read shard by shard; a bf16 file is quantised at load on every rank first.
        state_dict, scale_map = read_or_quantize_fp8(path, None, load_key, fp8_layer_names(model))
        convert_fp8_linear(model, scale_map, compute_dtype=dtype or torch.float32, device=device)
    else:
        state_dict = load_dit_state_dict(path, load_key)
    check_dit_state_dict(model, state_dict)
    real_buffers = {name: b for name, b in model.named_buffers() if not b.is_meta}  # the fp8 scales
    shard_dit(model, state)
    model.to_empty(device=device)  # storage for this rank's shards only
    for name, buffer in real_buffers.items():  # to_empty emptied them too
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buffer.to(device))
    fill_shards(model, state_dict)
    del state_dict
    logger.info("DiT weights sharded over %d rank(s) (FSDP2): %.2f GiB on this rank, from %s",
                state.world_size, local_weight_bytes(model) / 2**30, path)
    return model.eval()
