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


def merge_objects(
    stats: ObjectStats,
    links: np.ndarray,
    touches: np.ndarray,
    contacts: np.ndarray,
    min_size: int,
) -> Merged:
    """Union-find over the face pairs, then drop unseeded and small objects and number the rest.

    `links` always join (same connected component, or same watershed seed); `touches` join only while at
    most one side holds a seed, so that foreground pieces no seed of their own block reached attach to a
    neighbouring object while two seeded objects never merge.
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
    final_of_root = np.zeros(len(merged.ids), np.uint64)
    final_of_root[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint64)
    row_final = final_of_root[np.searchsorted(merged.ids, roots)] if len(roots) else np.zeros(0, np.uint64)
    objects = ObjectStats(**{name: getattr(merged, name)[keep] for name in ObjectStats.FIELDS})
    equivalences = len(np.unique(np.concatenate([links, touches]).reshape(-1, 2), axis=0))
    return Merged(objects, final_of_root[keep], row_final, equivalences, len(uf))


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
