"""The block plan: which region each block writes and reads, in daisy's geometry.

Pure functions only. Write blocks tile the total region on a grid anchored at the volume origin whose
cells are whole output chunks, so each chunk is written by exactly one block and no two workers ever
touch the same chunk.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from daisy import Block, Roi

from pipeline.errors import GeometryError
from pipeline.geometry import Vec3, as_zyx, cell_ranges, roi_key, whole_chunks


@dataclass(frozen=True)
class BlockPlan:
    """Write blocks on a chunk-aligned grid over `roi`, each read with `context` voxels around it."""

    volume_shape: Vec3
    roi: Roi
    block_shape: Vec3
    chunk_shape: Vec3
    context: Vec3 = (0, 0, 0)

    @property
    def grid_begin(self) -> Vec3:
        """Index of the first grid cell that meets the region."""
        return tuple(r.start for r in cell_ranges(self.roi, self.block_shape))  # type: ignore[return-value]

    @property
    def grid_shape(self) -> Vec3:
        """Number of blocks along (z, y, x)."""
        return tuple(len(r) for r in cell_ranges(self.roi, self.block_shape))  # type: ignore[return-value]

    @property
    def num_blocks(self) -> int:
        return int(np.prod(self.grid_shape))

    def block_at(self, index: Iterable[int]) -> Block:
        """The block of grid cell `index` (relative to the first cell), with a stable integer id."""
        idx = tuple(index)
        cell = Roi(
            [(g + i) * s for g, i, s in zip(self.grid_begin, idx, self.block_shape, strict=True)], self.block_shape
        )
        write = cell.intersect(self.roi)
        read = write.grow(self.context, self.context)
        block_id = int(np.ravel_multi_index(idx, self.grid_shape))
        return Block(self.roi.grow(self.context, self.context), read, write, block_id=block_id)

    def index_of(self, block_id: int) -> Vec3:
        return tuple(int(i) for i in np.unravel_index(block_id, self.grid_shape))  # type: ignore[return-value]

    def blocks(self) -> Iterator[Block]:
        """Every block, lazily, in grid order (a terabyte plan is never held in memory)."""
        for index in itertools.product(*(range(n) for n in self.grid_shape)):
            yield self.block_at(index)


def plan_blocks(
    volume_shape: Iterable[int],
    chunk_shape: Iterable[int],
    block_shape: Iterable[int],
    roi: Roi | None = None,
    context: Iterable[int] = (0, 0, 0),
) -> BlockPlan:
    """Build and validate a plan; refuse block shapes that are not whole chunks or regions outside the volume."""
    shape = as_zyx(volume_shape, "volume shape")
    chunks = as_zyx(chunk_shape, "chunk shape")
    blocks = as_zyx(block_shape, "block shape")
    whole = Roi((0, 0, 0), shape)
    roi = whole if roi is None else roi
    if not whole.contains(roi) or roi.empty:
        raise GeometryError(
            f"region {roi_key(roi)} (offset:shape, z,y,x) is outside the volume of shape {shape}; "
            "choose a region inside it"
        )
    if any(b <= 0 or b % c for b, c in zip(blocks, chunks, strict=True)):
        raise GeometryError(
            f"block shape {blocks} is not a whole number of output chunks {chunks} on every axis; "
            f"use multiples such as {whole_chunks(blocks, chunks)}"
        )
    plan = BlockPlan(shape, roi, blocks, chunks, as_zyx(context, "context"))
    validate_write_rois((b.write_roi for b in plan.blocks()), chunks, shape)
    return plan


def validate_write_rois(write_rois: Iterable[Roi], chunk_shape: Vec3, volume_shape: Vec3) -> int:
    """Check that no output chunk is written by two regions; return the number of regions.

    A region may cover a chunk partly (at the volume or ROI border), but then it must be that chunk's only
    writer: concurrent partial writes to one chunk lose data.
    """
    grid = tuple(len(r) for r in cell_ranges(Roi((0, 0, 0), volume_shape), chunk_shape))
    owner = np.full(grid, -1, dtype=np.int64)
    count = 0
    for n, roi in enumerate(write_rois):
        count += 1
        cells = tuple(slice(r.start, r.stop) for r in cell_ranges(roi, chunk_shape))
        taken = owner[cells]
        if (taken >= 0).any():
            other = int(taken[taken >= 0].flat[0])
            raise GeometryError(
                f"write region {roi_key(roi)} (block {n}) shares output chunks with block {other}; "
                f"blocks must cover whole chunks of shape {chunk_shape} aligned to the chunk grid"
            )
        owner[cells] = n
    return count
