"""Geometry in voxels, (z, y, x) order: the `Vec3` type, region text, whole-chunk rounding and grid walks.

Pure functions only. Grids (of chunks or of blocks) are anchored at the volume origin, so cell `i` along an
axis covers voxels `[i * cell, (i + 1) * cell)`. daisy is imported where a region is made, so that configs,
which use `Vec3`, stay quick to import.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pipeline.errors import GeometryError

if TYPE_CHECKING:
    from daisy import Roi

Vec3 = tuple[int, int, int]
"""Three voxel counts or coordinates in (z, y, x) order."""


def as_zyx(values: Any, name: str) -> Vec3:
    """Three integers (z, y, x) from a sequence, with an error naming the field otherwise."""
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError) as err:
        raise GeometryError(f"{name} must be three integers (z, y, x), got {values!r}") from err
    if len(out) != 3:
        raise GeometryError(f"{name} must be three integers (z, y, x), got {values!r}")
    return out


def parse_roi(text: str) -> Roi:
    """A region from `OFFSET:SHAPE`, each three comma-separated voxel counts in (z, y, x)."""
    from daisy import Roi

    try:
        offset_text, shape_text = text.split(":")
        offset = [int(v) for v in offset_text.split(",")]
        shape = [int(v) for v in shape_text.split(",")]
    except ValueError as err:
        raise GeometryError(f"region {text!r} is not OFFSET:SHAPE such as 0,0,0:64,512,512 (z,y,x voxels)") from err
    if len(offset) != 3 or len(shape) != 3 or any(s <= 0 for s in shape) or any(o < 0 for o in offset):
        raise GeometryError(
            f"region {text!r} needs three offsets >= 0 and three sizes > 0 in z,y,x, e.g. 0,0,0:64,512,512"
        )
    return Roi(offset, shape)


def roi_key(roi: Roi) -> str:
    """A region as `OFFSET:SHAPE` text (what `parse_roi` reads), for hashing and messages."""
    return f"{','.join(map(str, roi.begin))}:{','.join(map(str, roi.shape))}"


def whole_chunks(target: Iterable[int], chunks: Iterable[int]) -> Vec3:
    """The shape of whole chunks nearest `target` on every axis (at least one chunk), e.g. a block shape."""
    return tuple(c * max(1, round(t / c)) for t, c in zip(target, chunks, strict=True))  # type: ignore[return-value]


def cell_ranges(roi: Roi, cell: Iterable[int]) -> tuple[range, ...]:
    """Per axis, the indices of the grid cells of shape `cell` that meet `roi`."""
    return tuple(range(b // c, -(-e // c)) for b, e, c in zip(roi.begin, roi.end, cell, strict=True))


def chunk_rois(region: Roi, chunks: Iterable[int], within: Roi | None = None) -> Iterator[Roi]:
    """The cells of the chunk grid that meet `region`, in (z, y, x) order, each clipped to `within` (default
    `region`)."""
    from daisy import Roi

    chunks = tuple(chunks)
    within = region if within is None else within
    for index in itertools.product(*cell_ranges(region, chunks)):
        yield Roi([i * c for i, c in zip(index, chunks, strict=True)], chunks).intersect(within)


def grid_shape(shape: Iterable[int], cell: Iterable[int]) -> Vec3:
    """Number of grid cells of shape `cell` along each axis of a volume of `shape` (the last ones clipped)."""
    return tuple(-(-s // c) for s, c in zip(shape, cell, strict=True))  # type: ignore[return-value]


def morton_box(grid: Iterable[int], bits: int) -> Vec3:
    """The (z, y, x) cells spanned by the lowest `bits` bits of a compressed Morton code over a grid of `grid` cells.

    Neuroglancer's precomputed sharding numbers chunks by compressed Morton code: bit by bit, x, then y, then z,
    skipping an axis once its cells are all numbered. With the identity hash, a shard holds the chunks whose codes
    agree above `preshift_bits + minishard_bits`: an aligned box of this shape (in chunks).
    """
    z, y, x = (int(g) for g in grid)
    sizes = {"x": x, "y": y, "z": z}
    spans = {"x": 1, "y": 1, "z": 1}
    level, left = 0, bits
    while left > 0 and any(2**level < n for n in sizes.values()):
        for axis in ("x", "y", "z"):
            if left > 0 and 2**level < sizes[axis]:
                spans[axis] *= 2
                left -= 1
        level += 1
    return (spans["z"], spans["y"], spans["x"])


def check_ownership(
    block_shape: Vec3, unit_shape: Vec3, unit: str = "output chunks", name: str = "block shape"
) -> None:
    """Refuse a block shape (`name`) that is not a whole number of `unit_shape` cells on every axis.

    This is the whole proof that each unit (chunk or shard) has one writer: both grids are anchored at the
    volume origin, so a block cell `[i * b, (i + 1) * b)` with `b = k * u` is exactly the units `[i * k, (i + 1) * k)`.
    A region of interest only clips blocks; a clipped unit still lies in one block's cell.
    """
    if any(u <= 0 for u in unit_shape):
        raise GeometryError(f"{unit} shape {unit_shape} must be > 0 on every axis (z, y, x)")
    if any(b <= 0 or b % u for b, u in zip(block_shape, unit_shape, strict=True)):
        raise GeometryError(
            f"{name} {block_shape} is not a whole number of {unit} {unit_shape} on every axis; "
            f"use multiples such as {whole_chunks(block_shape, unit_shape)}"
        )
