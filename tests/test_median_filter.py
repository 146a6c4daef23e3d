"""Median filtering of probabilities: speckle goes, the contour channel stays, bad sizes are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import ndimage

from pipeline.config.segment import SegmentConfig
from pipeline.median_filter import counting_median, median_filter, median_margin


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


@pytest.mark.parametrize(
    ("shape", "size"), [((9, 11, 13), 5), ((2, 6, 20, 21), 7), ((5, 4, 7), 7), ((1, 1, 1), 3), ((8, 24, 24), 3)]
)
@pytest.mark.parametrize("values", ["uniform", "saturated"])
def test_counting_median_equals_skimage_everywhere_edges_included(shape, size, values) -> None:
    """The GPU median equals the rank median voxel for voxel, also where the window leaves the array (there: the
    upper median of the voxels inside) and on arrays smaller than the window; leading axes are separate volumes."""
    rng = np.random.default_rng(3)
    if values == "uniform":
        quantised = rng.integers(0, 256, shape).astype(np.uint8)
    else:  # as a network's probabilities mostly are: 0 or 255, with ties everywhere
        quantised = rng.choice(np.array([0, 1, 128, 254, 255], np.uint8), shape, p=[0.45, 0.03, 0.04, 0.03, 0.45])
    probs = quantised.astype(np.float32)[..., None, :, :, :] / 255
    expected = median_filter(probs, size)[..., 0, :, :, :]
    found = counting_median(torch.from_numpy(quantised), size)
    assert found.dtype == torch.uint8 and found.shape == quantised.shape
    np.testing.assert_array_equal(found.numpy().astype(np.float32) / np.float32(255), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_counting_median_on_a_gpu_equals_skimage() -> None:
    """On a GPU the counts are summed in float16 (exact for sums of up to 2048 ones)."""
    quantised = np.random.default_rng(5).integers(0, 256, (2, 9, 40, 37)).astype(np.uint8)
    expected = median_filter(quantised.astype(np.float32)[:, None] / 255, 7)[:, 0]
    found = counting_median(torch.from_numpy(quantised).cuda(), 7).cpu().numpy()
    np.testing.assert_array_equal(found.astype(np.float32) / np.float32(255), expected)


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize(("shape", "size"), [((12, 40, 30), 7), ((2, 5, 9, 11), 5), ((4, 2, 6), 3)])
def test_threads_share_the_median_in_bands_that_give_the_same_values(threads, shape, size) -> None:
    """Bands of rows filtered in parallel equal the whole volume filtered at once, at band edges and the array's
    faces, also with more threads than rows."""
    quantised = np.random.default_rng(6).choice(np.array([0, 3, 90, 200, 255], np.uint8), shape)
    probs = quantised.astype(np.float32)[..., None, :, :, :] / 255
    expected = median_filter(probs, size)
    np.testing.assert_array_equal(median_filter(probs, size, threads=threads), expected)
    found = median_filter(torch.from_numpy(probs), size, threads=threads)
    np.testing.assert_array_equal(found.numpy(), expected)


def test_a_tensor_is_filtered_as_its_array_is() -> None:
    probs = np.random.default_rng(4).random((2, 2, 6, 12, 12)).astype(np.float32)  # a batch of two tiles
    found = median_filter(torch.from_numpy(probs), 5)
    assert isinstance(found, torch.Tensor)
    np.testing.assert_array_equal(found.numpy(), median_filter(probs, 5))
    np.testing.assert_array_equal(median_filter(probs, 5)[1], median_filter(probs[1], 5))


def test_size_zero_or_one_is_a_no_op_and_the_margin_is_half_the_size() -> None:
    probs = np.random.default_rng(2).random((1, 4, 6, 6)).astype(np.float32)
    assert median_filter(probs, 0) is probs and median_filter(probs, 1) is probs
    assert [median_margin(s) for s in (0, 3, 7)] == [0, 1, 3]


def test_even_size_is_refused_with_the_field_named() -> None:
    with pytest.raises(ValidationError, match="(?s)median_size.*odd size"):
        SegmentConfig(input="a.zarr", output=["b.zarr"], median_size=4)
