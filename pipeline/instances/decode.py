"""Decoding one block of probabilities into objects: seeded watershed or connected components.

Labels are local (1..n, 0 = background). For watershed, labels 1..n_seeded are the regions flooded from the
block's seeds and n_seeded+1..n are foreground pieces that no seed of the block reached ("orphans"); the
merge step attaches those to a seeded object of a neighbouring block, or drops them. For connected components,
labels 1..n_seeded are the components holding a voxel with mask > t1 and the rest follow; the merge keeps a
component when any of its pieces is seeded (hysteresis thresholding: t1 high, the threshold low).

Watershed floods on the inverted mask inside the foreground, with ties between equal mask probabilities (common
after uint8 storage) broken by raster order: the flooding priority of a voxel is its rank in the order (mask
descending, raster index ascending). skimage alone breaks ties between equal priorities by its heap's internal
order, which depends on every marker of the array, so a crop and the whole volume could disagree; with a strict
total order the flooding of a foreground component (connected component of mask > t3) depends on that
component's voxels and seeds only, and cropping keeps the raster order. Every foreground component is decoded
on its own, in its own bounding box (`decode_component`): one with a single seed component is one object, one
without seeds is an orphan, one with several is flooded from its seeds. The fix-up pass decodes a component that
crosses block borders with the same function over its global bounding box, so it gets exactly what decoding the
whole volume as one block gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config.instances import DecodeConfig
from pipeline.errors import ConfigError

SKIMAGE_CONNECTIVITY = {6: 1, 18: 2, 26: 3}


@dataclass(frozen=True)
class Decoded:
    """Local labels of a block and how many of them are seeded."""

    labels: np.ndarray
    """(z, y, x) local labels, 0 = background."""
    num_labels: int
    num_seeded: int
    components: np.ndarray | None = None
    """Watershed: the local foreground component (1..) of each label 1..n, as (n,) int64; None otherwise."""


def probabilities(raw: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as float32 from uint8 (probability x 255) or float storage."""
    if raw.dtype == np.uint8:
        return raw.astype(np.float32) / np.float32(255)
    if np.issubdtype(raw.dtype, np.floating):
        return raw.astype(np.float32, copy=False)
    raise ConfigError(
        f"probabilities stored as {raw.dtype} are not supported: expected uint8 (probability x 255) or float"
    )


def seed_mask(probs: np.ndarray, cfg: DecodeConfig) -> np.ndarray:
    """Watershed seeds: mask > t1 and contour < t2, inside the foreground (mask > t3). `probs` is (2, z, y, x)."""
    mask, contour = probs[0], probs[1]
    return (mask > cfg.seed_threshold) & (contour < cfg.contour_threshold) & (mask > cfg.foreground_threshold)


def foreground_mask(probs: np.ndarray, cfg: DecodeConfig) -> np.ndarray:
    """Voxels that belong to some object, for the (resolved) method of `cfg`."""
    if cfg.method == "watershed":
        return probs[0] > cfg.foreground_threshold
    return probs[0] > _threshold(cfg)


def _threshold(cfg: DecodeConfig) -> float:
    return 0.5 if cfg.threshold is None else cfg.threshold


def decode_block(raw: np.ndarray, cfg: DecodeConfig) -> Decoded:
    """Label the objects of one (channels, z, y, x) probability block with a resolved method."""
    import cc3d

    probs = probabilities(raw)
    foreground = foreground_mask(probs, cfg)
    if cfg.method == "components":
        labels, n = cc3d.connected_components(foreground, connectivity=cfg.connectivity, return_N=True)
        return seeded_first(labels, int(n), probs[0] > cfg.seed_threshold)
    if cfg.method != "watershed":
        raise ConfigError(f"decode method {cfg.method!r} must be resolved to 'watershed' or 'components' first")
    from scipy import ndimage

    fg, n_fg = cc3d.connected_components(foreground, connectivity=cfg.connectivity, return_N=True)
    markers, n_markers = cc3d.connected_components(seed_mask(probs, cfg), connectivity=cfg.connectivity, return_N=True)
    component_of_seed = np.zeros(int(n_markers) + 1, np.int64)
    component_of_seed[markers.ravel()] = fg.ravel()  # seeds lie inside the foreground
    seed_count = np.bincount(component_of_seed[1:], minlength=int(n_fg) + 1)
    seed_count[0] = 0
    n_seeded = int(seed_count.sum())
    single = np.flatnonzero(seed_count == 1)
    several = np.flatnonzero(seed_count >= 2)
    orphans = np.flatnonzero(seed_count == 0)[1:]
    table = np.zeros(int(n_fg) + 1, np.uint32)
    table[single] = np.arange(1, len(single) + 1, dtype=np.uint32)
    table[orphans] = np.arange(n_seeded + 1, n_seeded + len(orphans) + 1, dtype=np.uint32)
    labels = table[fg]
    components = [single]
    next_label = len(single)
    slices = ndimage.find_objects(fg) if len(several) else []
    for c in several.tolist():
        box = slices[c - 1]
        inside = fg[box] == c
        flooded, k = decode_component(probs[(slice(None), *box)], inside, cfg)
        view = labels[box]
        view[inside] = flooded[inside] + np.uint32(next_label)
        components.append(np.full(k, c, np.int64))
        next_label += k
    components.append(orphans)
    return Decoded(labels, n_seeded + len(orphans), n_seeded, np.concatenate(components).astype(np.int64))


def seeded_first(labels: np.ndarray, n: int, seeds: np.ndarray) -> Decoded:
    """Components numbered so that those holding a seed voxel come first (1..n_seeded), then the rest.

    The merge keeps an object when any of its pieces, in any block, is seeded: hysteresis thresholding over the
    whole volume, which drops faint blobs that never reach the seed threshold.
    """
    seeded = np.zeros(n + 1, bool)
    seeded[labels[seeds]] = True
    seeded[0] = False
    n_seeded = int(seeded.sum())
    table = np.zeros(n + 1, labels.dtype)
    table[seeded] = np.arange(1, n_seeded + 1, dtype=labels.dtype)
    table[1:][~seeded[1:]] = np.arange(n_seeded + 1, n + 1, dtype=labels.dtype)
    return Decoded(table[labels], n, n_seeded)


def decode_component(probs: np.ndarray, inside: np.ndarray, cfg: DecodeConfig) -> tuple[np.ndarray, int]:
    """Seeded watershed of one foreground component in its bounding box: local labels 1..k and k.

    `probs` is the (2, z, y, x) crop of the component's bounding box and `inside` its voxels there; voxels of
    other components are ignored. Every voxel of the component is reached when k > 0.
    """
    import cc3d
    from skimage.segmentation import watershed

    seeds = seed_mask(probs, cfg) & inside
    markers, k = cc3d.connected_components(seeds, connectivity=cfg.connectivity, return_N=True)
    if k == 0:
        return np.zeros(inside.shape, np.uint32), 0
    flooded = watershed(
        flooding_priority(probs[0], inside), markers, mask=inside, connectivity=SKIMAGE_CONNECTIVITY[cfg.connectivity]
    )
    return flooded.astype(np.uint32), int(k)


def flooding_priority(mask: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Each voxel of `inside` ranked by (mask probability descending, raster index ascending); 0 elsewhere.

    No two voxels share a priority, so watershed never meets a tie and the result does not depend on skimage's
    heap order; the ranks only order the voxels, so any crop that holds them gives the same flooding.
    """
    values = mask[inside]  # raster order
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    priority = np.zeros(inside.shape, np.float64)
    priority[inside] = ranks
    return priority
