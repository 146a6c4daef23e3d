"""Finding objects that continue across the faces between neighbouring blocks.

Each block looks only at its *low* faces (towards smaller z, y or x): its own first voxel layer against the
layer just outside, which belongs to the neighbours and is read from their provisional labels. A pair of
adjacent voxels in two different blocks is examined exactly once, by the block that holds the upper voxel along
the first axis (z, then y, then x) on which the two lie in different blocks. For that the outside layer is
grown by one voxel along the later axes (diagonal neighbours under 18- and 26-connectivity) and not along the
earlier ones (those pairs belong to an earlier axis). So the union of these pairs over all blocks is exactly
the set of adjacent voxel pairs that a whole-volume labelling would see across block borders.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from daisy import Coordinate, Roi


@dataclass(frozen=True)
class Face:
    """A low face of a block: its own first layer and the neighbours' layer just below it."""

    axis: int
    own: Roi
    other: Roi
    """The neighbours' layer; along axes after `axis` grown by one voxel on each side (clipped to the region)."""


def low_faces(write_roi: Roi, region: Roi) -> list[Face]:
    """The block's low faces that lie inside `region` (faces on the region border have no neighbour)."""
    faces = []
    for axis in range(3):
        if write_roi.begin[axis] <= region.begin[axis]:
            continue
        begin, shape = list(write_roi.begin), list(write_roi.shape)
        shape[axis] = 1
        own = Roi(begin, shape)
        grow = [1 if j > axis else 0 for j in range(3)]
        other = own.shift(Coordinate([-1 if j == axis else 0 for j in range(3)]))
        other = other.grow(Coordinate(grow), Coordinate(grow)).intersect(region)
        faces.append(Face(axis, own, other))
    return faces


def _plane(data: np.ndarray, axis: int) -> np.ndarray:
    """The 2D plane of a one-voxel-thick (z, y, x) slab."""
    return np.take(data, 0, axis=axis)


def padded_other(face: Face, other: np.ndarray) -> np.ndarray:
    """The neighbours' layer as a plane one voxel larger than the own plane on each side, zero where absent."""
    own_plane_shape = [s for j, s in enumerate(face.own.shape) if j != face.axis]
    out = np.zeros([s + 2 for s in own_plane_shape], dtype=other.dtype)
    start = [o - w + 1 for j, (o, w) in enumerate(zip(face.other.begin, face.own.begin, strict=True)) if j != face.axis]
    plane = _plane(other, face.axis)
    out[start[0] : start[0] + plane.shape[0], start[1] : start[1] + plane.shape[1]] = plane
    return out


def plane_offsets(connectivity: int) -> list[tuple[int, int]]:
    """In-plane offsets of the neighbours across a face (one step along the face normal is implied)."""
    limit = {6: 0, 18: 1, 26: 2}[connectivity]
    return [(du, dv) for du, dv in itertools.product((-1, 0, 1), repeat=2) if abs(du) + abs(dv) <= limit]


def _shifted(padded: np.ndarray, du: int, dv: int, shape: tuple[int, ...]) -> np.ndarray:
    return padded[1 + du : 1 + du + shape[0], 1 + dv : 1 + dv + shape[1]]


def adjacent_pairs(
    face: Face,
    own: np.ndarray,
    other: np.ndarray,
    connectivity: int,
    own_mask: np.ndarray | None = None,
    other_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Unique (own label, other label) pairs of adjacent non-zero voxels across `face`, as (n, 2) uint64.

    `own` and `other` are the (z, y, x) slabs of `face.own` and `face.other`; the optional masks (same
    shapes) restrict the pairs to voxels where both masks hold (e.g. seed voxels).
    """
    p = _plane(own, face.axis)
    q = padded_other(face, other)
    pm = p != 0 if own_mask is None else (p != 0) & _plane(own_mask, face.axis)
    qm = q != 0 if other_mask is None else (q != 0) & padded_other(face, other_mask)
    found = []
    for du, dv in plane_offsets(connectivity):
        qs = _shifted(q, du, dv, p.shape)
        both = pm & _shifted(qm, du, dv, p.shape)
        if both.any():
            found.append(np.stack([p[both], qs[both]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.uint64)
    return np.unique(np.concatenate(found).astype(np.uint64), axis=0)


def face_contacts(face: Face, own: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Counts of face-to-face voxel contacts across `face` as rows (own label, other label, axis, count).

    Zero labels are kept (a contact with background is object surface); rows with both labels zero are not.
    """
    p = _plane(own, face.axis)
    q = _shifted(padded_other(face, other), 0, 0, p.shape)
    keep = (p != 0) | (q != 0)
    if not keep.any():
        return np.zeros((0, 4), dtype=np.uint64)
    rows, counts = np.unique(np.stack([p[keep], q[keep]], axis=1).astype(np.uint64), axis=0, return_counts=True)
    axis = np.full((len(rows), 1), face.axis, dtype=np.uint64)
    return np.concatenate([rows, axis, counts[:, None].astype(np.uint64)], axis=1)
