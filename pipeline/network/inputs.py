"""The network's input contract: raw intensities as float32 in [0, 1], one function for training and inference."""

from __future__ import annotations

import numpy as np


def scale_input(raw: np.ndarray) -> np.ndarray:
    """Raw intensities as float32 in [0, 1] (integers divided by their type's maximum)."""
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)
    return raw.astype(np.float32)
