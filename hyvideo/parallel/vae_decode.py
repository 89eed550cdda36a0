"""Tile-parallel VAE decode: ranks decode different tiles of the official tiling plan, then all blend.

The original decodes the whole video on every rank. Here the VAE's tile plan (temporal tiles x spatial
tiles, see hyvideo/vae/tiling.py) is split over the ranks, each rank decodes its tiles, and the decoded
tiles are broadcast one at a time, in plan order, into the same streaming blender that single-process
decoding uses. Every rank therefore ends with the single-process tiled result, bit for bit the same
blend, while holding only its own tiles plus one row of tile edges.

Without tiling (``--no-vae-tiling``), or when the plan has a single tile, every rank decodes the whole.
"""

from __future__ import annotations

import heapq
import logging

import torch
import torch.distributed as dist

from hyvideo.parallel.groups import SequenceParallelState, as_wire
from hyvideo.vae.tiling import TileBlender, TilePlan

logger = logging.getLogger(__name__)


def _region_volume(region: tuple[slice, slice, slice], shape: tuple[int, int, int]) -> int:
    """Latent elements a tile reads once its slices are clipped to the (T, h, w) `shape`."""
    volume = 1
    for sl, size in zip(region, shape, strict=True):
        volume *= len(range(*sl.indices(size)))
    return volume


def assign_tiles(plan: TilePlan, latent_thw: tuple[int, int, int], world_size: int) -> list[int]:
    """Owner rank of every tile of `plan`: largest tiles first, each to the least-loaded rank.

    Deterministic (ties go to the lower tile index and rank), so every rank computes the same owners.
    """
    owners = [0] * len(plan.tiles)
    loads = [(0, rank) for rank in range(world_size)]  # a heap of (work so far, rank)
    by_size = sorted(plan.tiles, key=lambda tile: (-_region_volume(tile.region, latent_thw), tile.index))
    for tile in by_size:
        load, rank = heapq.heappop(loads)
        owners[tile.index] = rank
        heapq.heappush(loads, (load + _region_volume(tile.region, latent_thw), rank))
    return owners


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the decoded-tile metadata")
    return dtype


def parallel_vae_decode(vae, z: torch.Tensor, state: SequenceParallelState | None) -> torch.Tensor:
    """Decode latents with the VAE's tiling, the tiles spread over the ranks of `state`.

    Args:
        vae: an `AutoencoderKLCausal3D` (anything with plan_decode_tiles / decode_tile / decode), the same
            weights and tiling switches on every rank.
        z: (B, C_lat, T, h, w) latents already divided by the scaling factor, identical on every rank.
        state: the sequence-parallel state; None or a single process decodes locally with `vae.decode`.

    Returns:
        (B, C_out, 4 * (T - 1) + 1, 8h, 8w), equal to `vae.decode(z)` in one process, on every rank.
    """
    if z.ndim != 5:
        raise ValueError(f"latents must be (B, C, T, h, w), got shape {tuple(z.shape)}")
    if state is None or not state.enabled:
        return vae.decode(z)
    plan = vae.plan_decode_tiles(z.shape)
    if not plan.is_tiled:
        return vae.decode(z)  # nothing to split: every rank decodes the whole
    latent_thw = tuple(z.shape[-3:])
    owners = assign_tiles(plan, latent_thw, state.world_size)
    # 1. Decode this rank's tiles
    mine = {tile.index: vae.decode_tile(z, tile) for tile in plan.tiles if owners[tile.index] == state.rank}
    # 2. Share (shape, dtype) of every decoded tile, so receivers can allocate their buffers
    meta: dict[int, tuple[tuple[int, ...], str]] = {
        i: (tuple(t.shape), str(t.dtype)) for i, t in mine.items()
    }
    gathered: list = [None] * state.world_size
    dist.all_gather_object(gathered, meta)
    for part in gathered:
        meta.update(part)
    logger.debug("rank %d decoded %d of %d VAE tiles", state.rank, len(mine), len(plan.tiles))
    # 3. Broadcast the tiles in plan order into the streaming blender (same order and arithmetic as
    #    single-process decoding)
    blender = TileBlender(plan)
    for tile in plan.tiles:
        shape, dtype_name = meta[tile.index]
        owner = owners[tile.index]
        if owner == state.rank:
            decoded = mine.pop(tile.index).contiguous()
        else:
            decoded = torch.empty(shape, dtype=_dtype_from_name(dtype_name), device=z.device)
        dist.broadcast(as_wire(decoded), src=owner)  # a view of `decoded`: received bytes land there
        blender.push(decoded)
    return blender.result()
