"""Provisional instance IDs: every block labels its objects in its own uint64 range.

Block `b` owns the IDs `b * stride + 1 .. (b + 1) * stride`, where `stride` is the number of voxels of a
block (no block can hold more objects than voxels), so IDs of different blocks never collide and the block
of an ID is known from the ID alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.errors import GeometryError

ID_LIMIT = 2**63
"""Provisional IDs stay below this so that they also fit signed 64-bit integers (Parquet, numpy indices)."""


def id_stride(block_shape: Iterable[int]) -> int:
    """Width of each block's ID range: the number of voxels of a block."""
    return int(np.prod([int(s) for s in block_shape]))


def check_id_space(num_blocks: int, stride: int) -> None:
    """Refuse a plan whose provisional IDs would not fit below `ID_LIMIT`."""
    if num_blocks * stride >= ID_LIMIT:
        raise GeometryError(
            f"{num_blocks} blocks of {stride} voxels need provisional IDs up to {num_blocks * stride}, "
            f"beyond 2^63; use fewer, larger blocks or a smaller region"
        )


def block_base(block_id: int, stride: int) -> int:
    """The ID just below block `block_id`'s range (local label l becomes base + l)."""
    return int(block_id) * int(stride)


def to_provisional(local: np.ndarray, block_id: int, stride: int) -> np.ndarray:
    """Local labels 1..n (0 = background) as the block's provisional uint64 IDs."""
    out = local.astype(np.uint64)
    out[local != 0] += np.uint64(block_base(block_id, stride))
    return out


def block_of(ids: np.ndarray, stride: int) -> np.ndarray:
    """The block id of each provisional ID (IDs must be > 0)."""
    return (np.asarray(ids, dtype=np.uint64) - np.uint64(1)) // np.uint64(stride)
