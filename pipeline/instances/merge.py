"""On the client: merge the per-block objects through their equivalences and number the final objects 1..N."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.instances.measure import ObjectStats, merge_stats
from pipeline.instances.unionfind import UnionFind


@dataclass
class Merged:
    """The final objects, and the final ID of every provisional object."""

    objects: ObjectStats
    """One row per kept final object (IDs are the provisional roots), sorted by root."""
    final_ids: np.ndarray
    """Final ID of each row of `objects` (1..N in root order)."""
    row_final: np.ndarray
    """Final ID of each provisional row of the input statistics (0 = removed)."""
    equivalences: int
    """Unique provisional ID pairs found across block faces (the equivalence table)."""
    border_ids: int
    """Provisional IDs that take part in some equivalence."""
    extra_final: np.ndarray | None = None
    """Final ID of each row of the `extra` statistics (0 = removed), None without extra rows."""


def merge_objects(
    stats: ObjectStats,
    links: np.ndarray,
    touches: np.ndarray,
    contacts: np.ndarray,
    min_size: int,
    fixed: np.ndarray | None = None,
    extra: ObjectStats | None = None,
) -> Merged:
    """Union-find over the face pairs, then drop unseeded and small objects and number the rest.

    `links` always join (same connected component, or same watershed seed); `touches` join only while at
    most one side holds a seed, so that foreground pieces no seed of their own block reached attach to a
    neighbouring object while two seeded objects never merge.

    Rows flagged in `fixed` (pieces of components decoded again as a whole) are dropped and replaced by the
    `extra` objects (whole objects, all seeded), numbered after the others.
    """
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
    final_of_root = np.zeros(len(merged.ids), np.uint64)
    final_of_root[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint64)
    row_final = final_of_root[np.searchsorted(merged.ids, roots)] if len(roots) else np.zeros(0, np.uint64)
    objects = ObjectStats(**{name: getattr(merged, name)[keep] for name in ObjectStats.FIELDS})
    final_ids = final_of_root[keep]
    extra_final = None
    if extra is not None:
        extra_keep = extra.voxels >= min_size
        extra_final = np.zeros(len(extra), np.uint64)
        extra_final[extra_keep] = np.arange(1, int(extra_keep.sum()) + 1, dtype=np.uint64) + np.uint64(len(final_ids))
        kept = ObjectStats(**{name: getattr(extra, name)[extra_keep] for name in ObjectStats.FIELDS})
        objects = ObjectStats.concat([objects, kept])
        final_ids = np.concatenate([final_ids, extra_final[extra_keep]])
    equivalences = len(np.unique(np.concatenate([links, touches]).reshape(-1, 2), axis=0))
    return Merged(objects, final_ids, row_final, equivalences, len(uf), extra_final)


def block_tables(block_ids: np.ndarray, counts: np.ndarray, row_final: np.ndarray) -> dict[int, np.ndarray]:
    """Per block, the final ID of each local label (index 0 = background).

    `block_ids[i]` has `counts[i]` provisional objects, stored consecutively in `row_final` in block order.
    """
    tables = {}
    start = 0
    for block_id, count in zip(block_ids.tolist(), counts.tolist(), strict=True):
        tables[block_id] = np.concatenate([np.zeros(1, np.uint64), row_final[start : start + count]])
        start += count
    return tables
