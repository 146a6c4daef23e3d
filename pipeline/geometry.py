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
