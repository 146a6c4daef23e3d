"""Merging objects across block borders and numbering the final objects 1..N, with state for border objects only.

The decode task of each block splits its objects (`split_block`): those that touch a face between two blocks (for
the watershed, every piece of a foreground component that does) are *border* objects and go to the client; the
others are *interior* objects, decided inside their block, and stay in its files. The client merges the border
objects with union-find (`merge_objects`) and numbers everything by arithmetic: final objects are numbered in the
order of their root (smallest provisional ID), so the objects whose root lies in block b (its kept interior objects
and the merged objects rooted there) hold the consecutive IDs `first[b] + 1 .. first[b + 1]`, where `first` sums
the per-block counts. Each merged object's place among them follows from the number of kept interior objects below
its root, which the block stored; the interior objects take the IDs left over, in order (`interior_finals`). So the
merge's state grows with the border objects (and one count per block), never with interior objects or voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from daisy import Roi

from pipeline.errors import StorageError
from pipeline.instances.ids import block_of
from pipeline.instances.measure import ObjectStats, merge_stats
from pipeline.instances.unionfind import UnionFind


@dataclass
class BorderObjects:
    """The objects that touch a face between blocks, of one block or of all blocks in block order."""

    stats: ObjectStats
    """One row per object (piece), provisional IDs ascending."""
    components: np.ndarray
    """Provisional foreground-component ID of each row (watershed; the row's own ID otherwise)."""
    before: np.ndarray
    """Per row: the kept interior objects of its block with a smaller ID (its place in the block's numbering)."""
    interior: np.ndarray
    """Per block: the number of its kept interior objects (seeded, at least `min_size` voxels)."""

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            **self.stats.to_arrays(),
            "components": self.components,
            "before": self.before,
            "interior": self.interior,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> BorderObjects:
        return cls(
            ObjectStats.from_arrays(arrays), arrays["components"], arrays["before"], np.atleast_1d(arrays["interior"])
        )

    @classmethod
    def concat(cls, parts: Sequence[BorderObjects]) -> BorderObjects:
        def join(name: str, empty: np.ndarray) -> np.ndarray:
            return np.concatenate([empty, *(getattr(p, name) for p in parts)])

        stats = ObjectStats.concat([p.stats for p in parts])
        empty = np.zeros(0, np.int64)
        return cls(stats, join("components", np.zeros(0, np.uint64)), join("before", empty), join("interior", empty))


def split_block(
    stats: ObjectStats,
    components: np.ndarray,
    roi: Roi,
    region_low: Sequence[bool],
    region_high: Sequence[bool],
    min_size: int,
) -> tuple[BorderObjects, ObjectStats]:
    """A block's objects (provisional IDs, bounding boxes in array voxels) as its border objects and its kept
    interior objects; removed interior objects (unseeded or under `min_size` voxels) are dropped here.

    `region_low[k]` / `region_high[k]`: the block's low / high face on axis k lies on the region border, where
    no block follows. A watershed piece counts as border when any piece of its foreground component touches a face
    between blocks, so that the fix-ups (`pipeline.instances.fixup`) see every piece of such a component.
    """
    begin, end = np.array(roi.begin), np.array(roi.end)
    on_face = ((stats.bbox_min == begin) & ~np.array(region_low)) | ((stats.bbox_max == end) & ~np.array(region_high))
    border = np.isin(components, components[on_face.any(axis=1)])
    kept = ~border & stats.seeded & (stats.voxels >= min_size)
    before = (np.cumsum(kept) - kept)[border].astype(np.int64)
    objects = BorderObjects(stats.select(border), components[border], before, np.array([kept.sum()], np.int64))
    return objects, stats.select(kept)


@dataclass
class Merged:
    """The merged border objects with their final IDs, and where every block's final IDs start."""

    objects: ObjectStats
    """One row per kept merged object (IDs are the provisional roots) in root order, then the `extra` objects."""
    final_ids: np.ndarray
    """Final ID of each row of `objects` (ascending)."""
    row_final: np.ndarray
    """Final ID of each border row of the input (0 = removed)."""
    first: np.ndarray
    """(blocks + 1,): the objects rooted in block b hold the final IDs `first[b] + 1 .. first[b + 1]`."""
    num_objects: int
    """All final objects: interior, merged and `extra`."""
    equivalences: int
    """Unique provisional ID pairs found across block faces (the equivalence table)."""
    border_ids: int
    """Provisional IDs that take part in some equivalence."""
    extra_final: np.ndarray | None = None
    """Final ID of each row of the `extra` statistics (0 = removed), None without extra rows."""


def merge_objects(
    border: BorderObjects,
    links: np.ndarray,
    touches: np.ndarray,
    contacts: np.ndarray,
    min_size: int,
    stride: int,
    fixed: np.ndarray | None = None,
    extra: ObjectStats | None = None,
) -> Merged:
    """Union-find over the face pairs, then drop unseeded and small objects and number the rest.

    `links` always join (same connected component, or same watershed seed); `touches` join only while at
    most one side holds a seed, so that foreground pieces no seed of their own block reached attach to a
    neighbouring object while two seeded objects never merge.

    Rows flagged in `fixed` (pieces of components decoded again as a whole) are dropped and replaced by the
    `extra` objects (whole objects, all seeded), numbered after all the others.
    """
    stats = border.stats
    uf = UnionFind()
    if len(touches):
        in_pairs = np.unique(np.concatenate([links.ravel(), touches.ravel()]))
        for seeded_id in in_pairs[np.isin(in_pairs, stats.ids[stats.seeded])].tolist():
            uf.flag(seeded_id)
    uf.union_pairs(links)
    uf.union_pairs(touches, keep_flagged_apart=True)
    roots = uf.roots(stats.ids)
    contact_roots = uf.roots(contacts[:, :2].ravel()).reshape(-1, 2) if len(contacts) else contacts[:, :2]
    merged = merge_stats(stats, roots, contacts, contact_roots)
    keep = merged.seeded & (merged.voxels >= min_size)
    if fixed is not None and fixed.any():
        keep &= ~np.isin(merged.ids, roots[fixed])
    first, final_ids = _number(merged.ids[keep], border, stride)
    final_of_root = np.zeros(len(merged.ids), np.uint64)
    final_of_root[keep] = final_ids
    row_final = final_of_root[np.searchsorted(merged.ids, roots)] if len(roots) else np.zeros(0, np.uint64)
    objects = merged.select(keep)
    extra_final = None
    if extra is not None:
        extra_keep = extra.voxels >= min_size
        extra_final = np.zeros(len(extra), np.uint64)
        extra_final[extra_keep] = np.arange(1, int(extra_keep.sum()) + 1, dtype=np.uint64) + np.uint64(first[-1])
        objects = ObjectStats.concat([objects, extra.select(extra_keep)])
        final_ids = np.concatenate([final_ids, extra_final[extra_keep]])
    num_objects = int(first[-1]) + len(final_ids) - int(keep.sum())
    equivalences = len(np.unique(np.concatenate([links, touches]).reshape(-1, 2), axis=0))
    return Merged(objects, final_ids, row_final, first, num_objects, equivalences, len(uf), extra_final)


def _number(kept_roots: np.ndarray, border: BorderObjects, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each block's final IDs start, and the final ID of each kept root (roots ascending).

    A root's ID is the start of its block, plus the kept interior objects and kept roots of the block below it.
    """
    block = block_of(kept_roots, stride).astype(np.int64)
    counts = border.interior + np.bincount(block, minlength=len(border.interior))
    first = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
    rank = np.arange(len(kept_roots)) - np.searchsorted(block, block)
    below = border.before[np.searchsorted(border.stats.ids, kept_roots)]
    return first, (first[block] + below + rank + 1).astype(np.uint64)


def interior_finals(first: int, end: int, merged_final: np.ndarray, count: int) -> np.ndarray:
    """Final IDs of a block's `count` kept interior objects, in ID order: those of `first + 1 .. end` that the
    block's merged objects (`merged_final`, final IDs of its border rows) do not hold."""
    ids = np.arange(first + 1, end + 1, dtype=np.uint64)
    free = ids[~np.isin(ids, merged_final)]
    if len(free) != count:
        raise StorageError(
            f"a block's stored objects disagree with the merge ({len(free)} final IDs left for {count} interior "
            "objects): its per-block files come from another run; run again without resume (--no-resume)"
        )
    return free
