"""The block plan: which region each block writes and reads, in daisy's geometry.

Pure functions only, and O(1) in the size of the volume. Write blocks tile the total region on a grid
anchored at the volume origin whose cells are whole write units (output chunks, or shards for sharded
outputs). Chunk ownership follows from arithmetic, not from a walk over blocks: when the block shape is a
multiple of the unit on every axis and both grids start at the origin, every unit lies inside exactly one
block cell, so no two blocks ever write the same chunk or shard. Blocks are made on demand from their id.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

from daisy import Block, Roi

from pipeline.errors import GeometryError
from pipeline.geometry import Vec3, as_zyx, cell_ranges, check_ownership, roi_key


@dataclass(frozen=True)
class BlockPlan:
    """Write blocks on a chunk- (or shard-) aligned grid over `roi`, each read with `context` voxels around it."""

    volume_shape: Vec3
    roi: Roi
    block_shape: Vec3
    chunk_shape: Vec3
    context: Vec3 = (0, 0, 0)
    shard_shape: Vec3 | None = None
    """The shard every block holds whole (sharded outputs), or None when outputs are one file per chunk."""

    @cached_property
    def grid_begin(self) -> Vec3:
        """Index of the first grid cell that meets the region."""
        return tuple(r.start for r in cell_ranges(self.roi, self.block_shape))  # type: ignore[return-value]

    @cached_property
    def grid_shape(self) -> Vec3:
        """Number of blocks along (z, y, x)."""
        return tuple(len(r) for r in cell_ranges(self.roi, self.block_shape))  # type: ignore[return-value]

    @property
    def num_blocks(self) -> int:
        return math.prod(self.grid_shape)

    def block_at(self, index: Iterable[int]) -> Block:
        """The block of grid cell `index` (relative to the first cell), with a stable integer id."""
        idx = tuple(int(i) for i in index)
        if len(idx) != 3 or any(not 0 <= i < n for i, n in zip(idx, self.grid_shape, strict=True)):
            raise GeometryError(f"block index {idx} is outside the plan's grid of {self.grid_shape} blocks (z,y,x)")
        cell = Roi(
            [(g + i) * s for g, i, s in zip(self.grid_begin, idx, self.block_shape, strict=True)], self.block_shape
        )
        write = cell.intersect(self.roi)
        read = write.grow(self.context, self.context)
        _, ny, nx = self.grid_shape
        block_id = (idx[0] * ny + idx[1]) * nx + idx[2]
        return Block(self.roi.grow(self.context, self.context), read, write, block_id=block_id)

    def index_of(self, block_id: int) -> Vec3:
        """The grid index (z, y, x) of block `block_id`: the inverse of the id that `block_at` gives."""
        if not 0 <= block_id < self.num_blocks:
            raise GeometryError(f"block id {block_id} is outside the plan's 0..{self.num_blocks - 1}")
        _, ny, nx = self.grid_shape
        zy, x = divmod(int(block_id), nx)
        z, y = divmod(zy, ny)
        return (z, y, x)

    def block(self, block_id: int) -> Block:
        """Block `block_id`, made from its id alone (any block of any plan, without walking the others)."""
        return self.block_at(self.index_of(block_id))

    def blocks(self) -> Iterator[Block]:
        """Every block, lazily, in id order (a petabyte plan is never held in memory)."""
        for index in itertools.product(*(range(n) for n in self.grid_shape)):
            yield self.block_at(index)


def common_shard(chunk_shape: Vec3, write_units: Iterable[Vec3]) -> Vec3 | None:
    """The smallest shape of whole write units (`VolumeMeta.write_unit`) of every output, per-axis least common
    multiple, for `plan_blocks(shard_shape=...)`; None when no output is sharded (every unit is the chunk)."""
    units = set(write_units)
    if units <= {chunk_shape}:
        return None
    return tuple(math.lcm(*axis) for axis in zip(*units, strict=True))  # type: ignore[return-value]


def plan_blocks(
    volume_shape: Iterable[int],
    chunk_shape: Iterable[int],
    block_shape: Iterable[int],
    roi: Roi | None = None,
    context: Iterable[int] = (0, 0, 0),
    shard_shape: Iterable[int] | None = None,
) -> BlockPlan:
    """Build and validate a plan in constant time; refuse blocks that are not whole chunks (and whole shards,
    when `shard_shape` is given) and regions outside the volume."""
    shape = as_zyx(volume_shape, "volume shape")
    chunks = as_zyx(chunk_shape, "chunk shape")
    blocks = as_zyx(block_shape, "block shape")
    margin = as_zyx(context, "context")
    whole = Roi((0, 0, 0), shape)
    roi = whole if roi is None else roi
    if any(s <= 0 for s in shape) or roi.empty or not whole.contains(roi):
        raise GeometryError(
            f"region {roi_key(roi)} (offset:shape, z,y,x) is outside the volume of shape {shape}; "
            "choose a region inside it"
        )
    if any(m < 0 for m in margin):
        raise GeometryError(f"context {margin} must be >= 0 voxels on every axis (z, y, x)")
    check_ownership(blocks, chunks)
    shards = None
    if shard_shape is not None:
        shards = as_zyx(shard_shape, "shard shape")
        check_ownership(shards, chunks, "output chunks", "shard shape")
        check_ownership(blocks, shards, "output shards")
    return BlockPlan(shape, roi, blocks, chunks, margin, shards)
