"""Exact watershed across block borders: foreground components that cross block borders with several seeds.

Whole-volume watershed restricted to the foreground, with ties broken by raster order (see `decode`), decides
every foreground component (connected component of mask > t3) from that component's own voxels and seeds only.
The blockwise passes therefore already equal whole-volume decoding for every component that lies inside one block,
for every component with a single seed component (it is one object wherever it runs) and for every seedless
component (removed). What is left is a component that crosses block borders *and* holds two or more seed
components: each block would flood only from its own seeds, so dividing lines could move near borders. Such a
component is decoded again as a whole.

On the client, `plan_fixups` makes the foreground components global (their per-block pieces joined through the
same face pairs as the objects, with union-find) and lists those components with their bounding boxes. It sees the
border objects only (`merge.split_block`), which hold every piece of every component that crosses block borders.
One Dask task per component (`tasks.FixupTask`) reads the box (probabilities, and the provisional labels to tell
the component's voxels from those of other components), decodes it with `decode.decode_component`, exactly as
whole-volume decoding does, stores the small label array of the box in the job's per-block files and returns
the objects' statistics. The merge numbers those objects with the others, and the relabel pass of each block
writes them into its own chunks from the stored arrays.

Bound: the bounding box of one such component (two float channels, its labels) must fit in a worker's memory.
Mitochondria are small, so this holds for any reasonable volume; a foreground component spanning most of a
large volume (e.g. a badly thresholded map) would not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from daisy import Roi

from pipeline.instances.ids import block_of
from pipeline.instances.measure import ObjectStats
from pipeline.instances.unionfind import UnionFind


@dataclass(frozen=True)
class Fixup:
    """A foreground component to decode as a whole."""

    key: int
    """The component's global ID (its smallest provisional foreground-component ID); names its file."""
    begin: tuple[int, int, int]
    end: tuple[int, int, int]
    """Bounding box in array voxels (end exclusive)."""
    members: np.ndarray
    """Sorted provisional object IDs of the component's per-block pieces."""

    @property
    def roi(self) -> Roi:
        return Roi(self.begin, tuple(e - b for b, e in zip(self.begin, self.end, strict=True)))


def plan_fixups(
    stats: ObjectStats, components: np.ndarray, links: np.ndarray, touches: np.ndarray, stride: int
) -> tuple[list[Fixup], np.ndarray]:
    """The components to decode as a whole, and which provisional rows of `stats` belong to one of them.

    `stats` are the border objects of all blocks and `components[i]` is the provisional foreground-component ID of
    row i (rows sorted by ID, as the blocks store them); `touches` are all object pairs adjacent across block
    faces, `links` those adjacent through seeds.
    """
    ids = stats.ids
    fixed = np.zeros(len(ids), bool)
    if not len(touches):
        return [], fixed
    parts = UnionFind()
    parts.union_pairs(components[np.searchsorted(ids, touches.ravel())].reshape(-1, 2))
    component = parts.roots(components)
    seeds = UnionFind()
    seeds.union_pairs(links)
    seed = seeds.roots(ids)
    uniq, inv = np.unique(component, return_inverse=True)
    blocks = np.unique(np.stack([inv, block_of(ids, stride).astype(np.int64)], axis=1), axis=0)
    num_blocks = np.bincount(blocks[:, 0], minlength=len(uniq))
    seeded = np.unique(np.stack([inv[stats.seeded], seed[stats.seeded].astype(np.int64)], axis=1), axis=0)
    num_seeds = np.bincount(seeded[:, 0], minlength=len(uniq)) if len(seeded) else np.zeros(len(uniq), np.int64)
    chosen = np.flatnonzero((num_blocks > 1) & (num_seeds >= 2))
    fixed = np.isin(inv, chosen)
    fixups = []
    for c in chosen.tolist():
        rows = inv == c
        begin = tuple(int(v) for v in stats.bbox_min[rows].min(axis=0))
        end = tuple(int(v) for v in stats.bbox_max[rows].max(axis=0))
        fixups.append(Fixup(int(uniq[c]), begin, end, np.sort(ids[rows])))  # type: ignore[arg-type]
    return fixups, fixed
