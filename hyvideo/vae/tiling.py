"""Tiled encode/decode geometry and blending, reproducing the original's tiles, order, blends and crops.

A `TilePlan` enumerates tiles (temporal-major, then row-major) with the input region of each. Tiles can be
processed independently (e.g. on different ranks) and then blended with `blend_tiles`, or streamed in plan
order through a `TileBlender`, which keeps only what later tiles still need. Both give the original's result:
each tile is blended in place with the already-blended tile above (H), then the one to the left (W), cropped;
temporal tiles after the first lose their first frame, are blended with the previous blended temporal tile
(T) and cropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TileGeometry:
    """Tile sizes in sample units (pixels, frames) and the overlap factor; latent sizes derive from them.

    Defaults are the released model's: 256 px / 32 latent, 64 frames / 16 latent, overlap 0.25.
    """

    sample_size: int = 256
    sample_tsize: int = 64
    overlap_factor: float = 0.25
    spatial_ratio: int = 8
    time_ratio: int = 4

    def __post_init__(self) -> None:
        if self.sample_size % self.spatial_ratio or self.sample_tsize % self.time_ratio:
            raise ValueError(
                f"tile sizes must be multiples of the compression ratios: sample_size {self.sample_size} "
                f"(ratio {self.spatial_ratio}), sample_tsize {self.sample_tsize} (ratio {self.time_ratio})"
            )
        if not 0.0 <= self.overlap_factor < 1.0:
            raise ValueError(f"overlap_factor must be in [0, 1), got {self.overlap_factor}")
        strides = (self.decode_spatial.stride, self.decode_temporal.stride)
        strides += (self.encode_spatial.stride, self.encode_temporal.stride)
        if min(strides) < 1:
            raise ValueError(f"tiles too small for overlap {self.overlap_factor}: {self}")
        # Tiles only fit together if each keeps exactly one stride of output (as 256/192/64 px do).
        aligned = (
            self.encode_spatial.stride == self.encode_spatial.keep * self.spatial_ratio
            and self.encode_temporal.stride == self.encode_temporal.keep * self.time_ratio
            and self.decode_spatial.stride * self.spatial_ratio == self.decode_spatial.keep
            and self.decode_temporal.stride * self.time_ratio == self.decode_temporal.keep
        )
        if not aligned:
            raise ValueError(
                f"tile geometry {self} does not tile evenly: the part of each tile that is kept must equal "
                "the tile stride on both the encode and the decode side (e.g. sample_size 256, "
                "sample_tsize 64, overlap_factor 0.25)"
            )

    @property
    def latent_size(self) -> int:
        # Parity: the original computes int(sample_size / 2 ** (len(block_out_channels) - 1)).
        return int(self.sample_size / self.spatial_ratio)

    @property
    def latent_tsize(self) -> int:
        return self.sample_tsize // self.time_ratio

    @property
    def decode_spatial(self) -> AxisRule:
        blend = int(self.sample_size * self.overlap_factor)
        stride = int(self.latent_size * (1 - self.overlap_factor))
        return AxisRule(self.latent_size, stride, blend, self.sample_size - blend, first_extra=0)

    @property
    def decode_temporal(self) -> AxisRule:
        blend = int(self.sample_tsize * self.overlap_factor)
        stride = int(self.latent_tsize * (1 - self.overlap_factor))
        # Parity: temporal tiles read one extra latent frame; later tiles drop their first decoded frame.
        return AxisRule(self.latent_tsize + 1, stride, blend, self.sample_tsize - blend, first_extra=1)

    @property
    def encode_spatial(self) -> AxisRule:
        blend = int(self.latent_size * self.overlap_factor)
        stride = int(self.sample_size * (1 - self.overlap_factor))
        return AxisRule(self.sample_size, stride, blend, self.latent_size - blend, first_extra=0)

    @property
    def encode_temporal(self) -> AxisRule:
        blend = int(self.latent_tsize * self.overlap_factor)
        stride = int(self.sample_tsize * (1 - self.overlap_factor))
        return AxisRule(self.sample_tsize + 1, stride, blend, self.latent_tsize - blend, first_extra=1)


@dataclass(frozen=True)
class AxisRule:
    """How one axis is tiled: tile length and stride in input units, blend and kept length in output units.

    `first_extra` is 1 on the time axis: the first tile keeps keep + 1 frames, later tiles drop their first.
    """

    length: int
    stride: int
    blend: int
    keep: int
    first_extra: int


@dataclass(frozen=True)
class Tile:
    """One tile: its (t, row, col) position in the plan and the input region (T, H, W slices) it reads."""

    index: int
    t: int
    row: int
    col: int
    region: tuple[slice, slice, slice]


@dataclass(frozen=True)
class TilePlan:
    """Every tile of one tiled encode or decode, in the order the original blends them."""

    temporal: AxisRule | None
    spatial_rows: AxisRule | None
    spatial_cols: AxisRule | None
    num_t: int
    num_rows: int
    num_cols: int
    tiles: tuple[Tile, ...]

    @property
    def is_tiled(self) -> bool:
        return len(self.tiles) > 1


def _starts(size: int, rule: AxisRule | None) -> list[int]:
    if rule is None:
        return [0]
    starts = list(range(0, size, rule.stride))
    if rule.first_extra and len(starts) > 1 and size - starts[-1] == 1:
        # Parity: a last temporal tile of a single frame/latent produces one output frame that the original
        # then drops; it contributes nothing, so it is not planned.
        starts.pop()
    return starts


def _axis_slice(start: int, rule: AxisRule | None) -> slice:
    return slice(None) if rule is None else slice(start, start + rule.length)


def plan_tiles(
    shape: tuple[int, int, int],
    *,
    temporal: AxisRule | None,
    spatial: tuple[AxisRule, AxisRule] | None,
) -> TilePlan:
    """Enumerate the tiles of an input of (T, H, W) `shape`; None for an axis rule means "not tiled"."""
    T, H, W = shape
    rows_rule, cols_rule = spatial if spatial is not None else (None, None)
    t_starts, r_starts, c_starts = _starts(T, temporal), _starts(H, rows_rule), _starts(W, cols_rule)
    tiles = []
    for ti, t0 in enumerate(t_starts):
        for ri, r0 in enumerate(r_starts):
            for ci, c0 in enumerate(c_starts):
                region = (_axis_slice(t0, temporal), _axis_slice(r0, rows_rule), _axis_slice(c0, cols_rule))
                tiles.append(Tile(len(tiles), ti, ri, ci, region))
    return TilePlan(temporal, rows_rule, cols_rule, len(t_starts), len(r_starts), len(c_starts), tuple(tiles))


def _tail(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """The last min(n, size) entries of x along dim (a view)."""
    n = min(n, x.shape[dim])
    return x.narrow(dim, x.shape[dim] - n, n)


def blend_into(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the end of `a` into the start of `b` along `dim`, in place on `b` (which is returned).

    With e = min(a.size, b.size, extent): b[y] = a[y - e] * (1 - y/e) + b[y] * (y/e) for y < e. This is the
    original's blend_v (dim -2), blend_h (dim -1) and blend_t (dim -3), vectorised over y.
    """
    e = min(a.shape[dim], b.shape[dim], extent)
    if e <= 0:
        return b
    # Parity: the weights are Python doubles rounded to the compute type, each product is rounded to b's
    # dtype before the sum, as `a * (1 - y / e) + b * (y / e)` does on fp32/fp16/bf16 tensors.
    compute = torch.float32 if b.dtype in _LOW_PRECISION else b.dtype
    ramp = torch.arange(e, dtype=torch.float64) / e
    shape = [1] * b.ndim
    shape[dim] = e
    w_b = ramp.to(device=b.device, dtype=compute).view(shape)
    w_a = (1 - ramp).to(device=b.device, dtype=compute).view(shape)
    a_edge = _tail(a, e, dim)
    b_edge = b.narrow(dim, 0, e)
    blended = (a_edge.to(compute) * w_a).to(b.dtype) + (b_edge.to(compute) * w_b).to(b.dtype)
    b_edge.copy_(blended)
    return b


class TileBlender:
    """Blends tiles pushed in plan order exactly as the original, holding only what later tiles need.

    Memory: the current temporal tile's finished rows, the bottom edges of the previous row of tiles, the
    previous temporal tile and the kept output, instead of every decoded tile at once.
    """

    def __init__(self, plan: TilePlan) -> None:
        self.plan = plan
        self._next = 0
        self._above_edges: list[torch.Tensor] = []  # bottom edges of the previous row's blended tiles
        self._row: list[torch.Tensor] = []  # blended tiles of the current row
        self._row_strips: list[torch.Tensor] = []  # finished (cropped, concatenated) rows
        self._prev_t: torch.Tensor | None = None  # previous blended temporal tile
        self._pieces: list[torch.Tensor] = []  # finished temporal pieces

    def push(self, tile: torch.Tensor) -> None:
        """Add the processed tile (B, C, T, H, W) for the next entry of `plan.tiles`."""
        if self._next >= len(self.plan.tiles):
            raise ValueError(f"all {len(self.plan.tiles)} tiles of the plan were already pushed")
        spec = self.plan.tiles[self._next]
        self._next += 1
        if self.plan.spatial_rows is None:
            self._push_temporal(spec.t, tile)
            return
        self._push_spatial(spec, tile)
        if spec.row == self.plan.num_rows - 1 and spec.col == self.plan.num_cols - 1:
            strips, self._row_strips, self._above_edges = self._row_strips, [], []
            self._push_temporal(spec.t, strips[0] if len(strips) == 1 else torch.cat(strips, dim=-2))

    def _push_spatial(self, spec: Tile, tile: torch.Tensor) -> None:
        rows, cols = self.plan.spatial_rows, self.plan.spatial_cols
        if spec.row > 0:
            blend_into(self._above_edges[spec.col], tile, rows.blend, dim=-2)
        if spec.col > 0:
            blend_into(self._row[spec.col - 1], tile, cols.blend, dim=-1)
        self._row.append(tile)
        if spec.col < self.plan.num_cols - 1:
            return
        # Row finished: keep its crop, and only the bottom edges that the next row blends with.
        kept = [t[..., : rows.keep, : cols.keep] for t in self._row]
        self._row_strips.append(kept[0] if len(kept) == 1 else torch.cat(kept, dim=-1))
        if spec.row < self.plan.num_rows - 1:
            self._above_edges = [_tail(t, rows.blend, dim=-2).clone() for t in self._row]
        self._row = []

    def _push_temporal(self, t: int, frames: torch.Tensor) -> None:
        rule = self.plan.temporal
        if rule is None:
            self._pieces.append(frames)
            return
        if t > 0:
            frames = frames[:, :, 1:]
            blend_into(self._prev_t, frames, rule.blend, dim=-3)
        self._pieces.append(frames[:, :, : rule.keep + (rule.first_extra if t == 0 else 0)])
        self._prev_t = frames if t < self.plan.num_t - 1 else None

    def result(self) -> torch.Tensor:
        """The blended output; every tile of the plan must have been pushed."""
        if self._next != len(self.plan.tiles):
            raise ValueError(f"only {self._next} of {len(self.plan.tiles)} tiles were pushed")
        pieces = self._pieces
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def blend_tiles(tiles: Iterable[torch.Tensor], plan: TilePlan) -> torch.Tensor:
    """Blend independently processed tiles, given in `plan.tiles` order, into the full output."""
    blender = TileBlender(plan)
    for tile in tiles:
        blender.push(tile)
    return blender.result()
