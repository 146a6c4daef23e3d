"""Median filtering of the mitochondrion probabilities: removes speckle and ragged boundaries before thresholding.

PyTorch Connectomics' Lucchi result uses a 7^3 median on the probability map. skimage's histogram rank filter on
uint8 (probabilities at the 1/255 resolution the outputs store) runs at about 1 Mvoxel/s per core at size 7, 6x
faster than scipy's sorting filter on floats; near the array's edge it uses the part of the window inside.
"""

from __future__ import annotations

import numpy as np
from skimage.filters import rank

MASK_CHANNEL = 0


def median_margin(size: int) -> int:
    """Voxels of prediction a `size`^3 median needs on each side of the region it filters."""
    return size // 2


def median_filter(probs: np.ndarray, size: int) -> np.ndarray:
    """(C, Z, Y, X) probabilities with channel 0 (mitochondrion) median-filtered over a `size`^3 cube.

    Other channels (the thin contour band) are left as they are: a median would erase them. Size 0 or 1 = no-op.
    """
    if size <= 1:
        return probs
    out = probs.copy()
    quantised = np.rint(np.clip(probs[MASK_CHANNEL], 0.0, 1.0) * 255.0).astype(np.uint8)
    footprint = np.ones((size, size, size), dtype=bool)
    out[MASK_CHANNEL] = rank.median(quantised, footprint=footprint).astype(probs.dtype) / np.float32(255.0)
    return out
