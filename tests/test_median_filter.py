"""Median filtering of probabilities: speckle goes, the contour channel stays, bad sizes are refused."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from pipeline.config.segment import SegmentConfig
from pipeline.median_filter import median_filter, median_margin


def test_median_removes_speckle_and_keeps_the_contour_channel() -> None:
    rng = np.random.default_rng(0)
    probs = np.zeros((2, 12, 20, 20), np.float32)
    probs[0, 3:9, 5:15, 5:15] = 0.9  # an object
    speckle = rng.random((12, 20, 20)) < 0.02
    probs[0][speckle] = 1.0 - probs[0][speckle]
    probs[1] = rng.random((12, 20, 20))
    out = median_filter(probs, 3)
    assert out.dtype == np.float32 and out.shape == probs.shape
    np.testing.assert_array_equal(out[1], probs[1])
    np.testing.assert_allclose(out[0, 4:8, 6:14, 6:14], np.float32(230 / 255))  # 0.9 at 1/255 resolution
    assert (out[0] >= 0.5).sum() < (probs[0] >= 0.5).sum()  # isolated bright voxels outside are gone
    assert out[0, :, :3].max() == 0 and out[0, :, :, 17:].max() == 0


def test_median_matches_scipy_inside_and_uses_only_voxels_inside_at_the_edge() -> None:
    probs = np.random.default_rng(1).integers(0, 256, (1, 9, 11, 13)).astype(np.float32) / 255
    out = median_filter(probs, 5)
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(out[0][inner], ndimage.median_filter(probs[0], size=5)[inner], atol=1e-6)
    corner = np.sort(probs[0, :3, :3, :3].ravel())
    assert out[0, 0, 0, 0] in corner[13:15]  # the median of the 27 voxels inside the volume


def test_size_zero_or_one_is_a_no_op_and_the_margin_is_half_the_size() -> None:
    probs = np.random.default_rng(2).random((1, 4, 6, 6)).astype(np.float32)
    assert median_filter(probs, 0) is probs and median_filter(probs, 1) is probs
    assert [median_margin(s) for s in (0, 3, 7)] == [0, 1, 3]


def test_even_size_is_refused_with_the_field_named() -> None:
    with pytest.raises(ValidationError, match="(?s)median_size.*odd size"):
        SegmentConfig(input="a.zarr", output=["b.zarr"], median_size=4)
