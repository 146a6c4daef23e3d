"""Decoding one block of probabilities into objects: seeded watershed or connected components.

Labels are local (1..n, 0 = background). For watershed, labels 1..n_seeded are the regions flooded from the
block's seeds and n_seeded+1..n are foreground pieces that no seed of the block reached ("orphans"); the
merge step attaches those to a seeded object of a neighbouring block, or drops them.
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
        return Decoded(labels, int(n), int(n))
    if cfg.method != "watershed":
        raise ConfigError(f"decode method {cfg.method!r} must be resolved to 'watershed' or 'components' first")
    from skimage.segmentation import watershed

    seeds = seed_mask(probs, cfg)
    markers, n_seeded = cc3d.connected_components(seeds, connectivity=cfg.connectivity, return_N=True)
    labels = np.zeros(foreground.shape, dtype=np.uint32)
    if n_seeded:
        labels = watershed(
            -probs[0], markers, mask=foreground, connectivity=SKIMAGE_CONNECTIVITY[cfg.connectivity]
        ).astype(np.uint32)
    orphans = foreground & (labels == 0)
    pieces, n_orphans = cc3d.connected_components(orphans, connectivity=cfg.connectivity, return_N=True)
    labels[orphans] = pieces[orphans] + np.uint32(n_seeded)
    return Decoded(labels, int(n_seeded + n_orphans), int(n_seeded))
