"""Patch grid, mirror padding and blending: blockwise equals whole-volume, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from daisy import Roi

from pipeline.errors import GeometryError
from pipeline.stitching import (
    Batched,
    PatchGrid,
    axis_starts,
    blend_weights,
    mirror_indices,
    predict_region,
    read_mirrored,
    tile_forward,
    to_output_dtype,
)


def fake_network(patch: np.ndarray) -> np.ndarray:
    """A patch function whose output depends on neighbours and on the position inside the patch."""
    c = patch[:, 1:-1, 4:-4, 4:-4]
    ramp = np.linspace(0.0, 0.1, c.shape[-1], dtype=np.float32)
    return np.tanh(3 * c + patch[:, :-2, 4:-4, 3:-5]) * 0.5 + ramp


def mixing_network(patches):
    """A patch (or batch) function of NumPy arrays or torch tensors alike, with the same rounding in both (products
    and sums only); its output depends on neighbours and on the position inside the patch."""
    c = patches[..., 1:-1, 4:-4, 4:-4]
    ramp = np.linspace(0.0, 0.1, c.shape[-1], dtype=np.float32)
    if not isinstance(patches, np.ndarray):
        ramp = torch.from_numpy(ramp)
    return c * 0.6 + patches[..., :-2, 4:-4, 3:-5] * 0.3 + ramp


def padded_input(volume: np.ndarray, roi: Roi, grid: PatchGrid) -> tuple[np.ndarray, Roi]:
    def read(r: Roi) -> np.ndarray:
        return volume[(slice(None), *(slice(b, e) for b, e in zip(r.begin, r.end, strict=True)))]

    read_roi = grid.read_roi(roi)
    return read_mirrored(read, read_roi, volume.shape[1:]), read_roi


def run(volume: np.ndarray, roi: Roi, grid: PatchGrid) -> np.ndarray:
    raw, read_roi = padded_input(volume, roi, grid)
    return predict_region(raw, read_roi, roi, grid, fake_network)


def test_mirror_indices_reflect_without_repeating_the_edge() -> None:
    assert mirror_indices(-3, 8, 5).tolist() == [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]
    assert mirror_indices(-2, 2, 1).tolist() == [0, 0, 0, 0]


def test_read_roi_covers_every_patch() -> None:
    grid = PatchGrid.with_overlap((8, 32, 32), (1, 4, 4), 0.25, (40, 100, 100))
    assert grid.output_shape == (6, 24, 24) and grid.stride == (4, 18, 18)
    write = Roi((10, 40, 40), (8, 16, 16))
    read = grid.read_roi(write)
    for tile in grid.tiles(write):
        assert read.contains(tile.grow(grid.context, grid.context))
        assert tile.intersects(write)


def test_overlap_per_axis_sets_each_stride() -> None:
    grid = PatchGrid.with_overlap((16, 64, 64), (2, 8, 8), (0.75, 0.25, 0.5), (40, 100, 100))
    assert grid.output_shape == (12, 48, 48) and grid.stride == (3, 36, 24)
    # along z every voxel away from the faces lies in 12 / 3 = 4 tiles, at four different depths in the patch
    depth = np.zeros(40, int)
    for tile in grid.tiles(Roi((0, 0, 0), (40, 100, 100))):
        if tile.begin[1:] == (0, 0):
            depth[tile.begin[0] : tile.end[0]] += 1
    assert depth[12:28].tolist() == [4] * 16


def test_tiles_stay_inside_the_volume_and_cover_it() -> None:
    shape = (17, 60, 64)
    grid = PatchGrid.with_overlap((8, 32, 32), (1, 4, 4), 0.25, shape)
    whole = Roi((0, 0, 0), shape)
    tiles = list(grid.tiles(whole))
    assert all(whole.contains(t) for t in tiles)
    covered = np.zeros(shape, bool)
    for t in tiles:
        covered[t.to_slices()] = True
    assert covered.all()
    # the last tile on each axis ends at the border, off the stride (16 - 6 = 11 is no multiple of 4)
    assert axis_starts(17, 6, 4) == (0, 4, 8, 11)
    assert max(t.end[0] for t in tiles) == 17
    # the read region reaches past the volume by the context only
    assert grid.read_roi(whole) == whole.grow(grid.context, grid.context)


def test_an_axis_shorter_than_a_tile_gets_one_tile_at_the_origin() -> None:
    assert axis_starts(5, 6, 4) == (0,)
    grid = PatchGrid.with_overlap((8, 32, 32), (1, 4, 4), 0.25, (5, 60, 64))
    assert {t.begin[0] for t in grid.tiles(Roi((0, 0, 0), (5, 60, 64)))} == {0}


@pytest.mark.parametrize(
    "sub", [Roi((0, 0, 0), (7, 20, 30)), Roi((5, 13, 17), (9, 30, 21)), Roi((13, 55, 61), (4, 5, 3))]
)
def test_sub_region_equals_whole_volume_bit_for_bit(sub: Roi) -> None:
    volume = np.random.default_rng(0).random((1, 17, 60, 64)).astype(np.float32)
    grid = PatchGrid.with_overlap((8, 32, 32), (1, 4, 4), 0.5, (17, 60, 64))
    whole = run(volume, Roi((0, 0, 0), (17, 60, 64)), grid)
    part = run(volume, sub, grid)
    assert np.array_equal(whole[(slice(None), *sub.to_slices())], part)


def test_tile_forward_filters_each_tile_then_cuts_its_edge() -> None:
    from pipeline.median_filter import median_filter

    patch = np.random.default_rng(1).random((1, 12, 40, 40)).astype(np.float32)
    tile = tile_forward(fake_network, median_size=3, trim=(1, 2, 2))(patch)
    expected = median_filter(fake_network(patch), 3)[:, 1:-1, 2:-2, 2:-2]
    assert tile.shape == (1, 8, 28, 28) and np.array_equal(tile, expected)
    assert tile_forward(fake_network) is fake_network  # nothing to add: the network's output as it is
    batch = np.stack([patch, patch[:, :, ::-1]])
    tiles = tile_forward(Batched(Counting()), median_size=3, trim=(1, 2, 2))
    assert isinstance(tiles, Batched)
    assert np.array_equal(tiles.fn(batch)[0], tile) and np.array_equal(
        tiles.fn(batch)[1], tile_forward(fake_network, median_size=3, trim=(1, 2, 2))(batch[1])
    )


def trimmed_grid(trim: tuple[int, int, int]) -> PatchGrid:
    """The grid of 8x32x32 patches whose margin is the test networks' context (1, 4, 4) plus `trim`."""
    return PatchGrid.with_overlap(
        (8, 32, 32), tuple(c + t for c, t in zip((1, 4, 4), trim, strict=True)), 0.5, (17, 60, 64)
    )


VOLUME = np.random.default_rng(3).random((1, 17, 60, 64)).astype(np.float32)


class Counting:
    """A `Batched` network that records the shape of every batch it is called with."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.append(batch.shape)
        return np.stack([fake_network(p) for p in batch])


@pytest.mark.parametrize("batch_size", [3, 7, 256])
@pytest.mark.parametrize("median", [0, 3])
def test_batches_equal_one_patch_at_a_time_bit_for_bit(batch_size: int, median: int) -> None:
    roi, grid = Roi((2, 9, 20), (8, 30, 41)), trimmed_grid((1, 2, 2))  # 100 tiles
    raw, read_roi = padded_input(VOLUME, roi, grid)
    one = predict_region(raw, read_roi, roi, grid, tile_forward(fake_network, median, (1, 2, 2)))
    network = Counting()
    batched = predict_region(
        raw, read_roi, roi, grid, tile_forward(Batched(network), median, (1, 2, 2)), "gaussian", batch_size
    )
    assert np.array_equal(one, batched)
    tiles = sum(1 for _ in grid.tiles(roi))
    assert tiles % batch_size and len(network.shapes) == -(-tiles // batch_size)  # the last batch is a partial one
    assert set(network.shapes) == {(batch_size, 1, 8, 32, 32)}  # padded: every call has the same shape


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize(("median", "trim"), [(0, (0, 0, 0)), (3, (1, 2, 2)), (5, (0, 0, 0))])
def test_torch_input_is_blended_on_its_device_bit_for_bit(batch_size: int, median: int, trim) -> None:
    """The device path (torch tensors, here on the CPU) sums the same tiles in the same order as NumPy."""
    roi, grid = Roi((0, 5, 7), (9, 30, 41)), trimmed_grid(trim)
    raw, read_roi = padded_input(VOLUME, roi, grid)
    expected = predict_region(raw, read_roi, roi, grid, tile_forward(mixing_network, median, trim))
    forward = tile_forward(Batched(mixing_network), median, trim)
    found = predict_region(torch.from_numpy(raw), read_roi, roi, grid, forward, "gaussian", batch_size)
    assert isinstance(found, torch.Tensor) and found.dtype == torch.float32
    assert np.array_equal(found.numpy(), expected)
    for dtype in ("uint8", "float16", "float32"):
        assert np.array_equal(to_output_dtype(found, dtype), to_output_dtype(expected, dtype))


@pytest.mark.parametrize("block", [(4, 16, 16), (5, 24, 20), (17, 60, 64), (3, 7, 64)])
@pytest.mark.parametrize("roi", [Roi((0, 0, 0), (17, 60, 64)), Roi((2, 9, 20), (13, 40, 41))])
def test_tiles_computed_counts_each_tile_once_per_block_it_meets(block, roi) -> None:
    grid = PatchGrid.with_overlap((8, 32, 32), (1, 4, 4), 0.25, (17, 60, 64))
    starts = [range((b // s) * s, e, s) for b, e, s in zip(roi.begin, roi.end, block, strict=True)]
    counted = 0
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                counted += sum(1 for _ in grid.tiles(Roi((z, y, x), block).intersect(roi)))
    assert grid.tiles_computed(roi, block) == counted


def test_blending_is_a_weighted_average() -> None:
    volume = np.full((1, 10, 40, 40), 0.3, np.float32)
    grid = PatchGrid.with_overlap((6, 24, 24), (1, 4, 4), 0.5, (10, 40, 40))
    out = run(volume, Roi((0, 0, 0), (10, 40, 40)), grid)
    expected = np.tanh(3 * 0.3 + 0.3) * 0.5
    assert out.min() >= expected - 1e-6 and out.max() <= expected + 0.1 + 1e-6


def test_weights_peak_in_the_centre_and_never_vanish() -> None:
    for kind in ("gaussian", "bump", "constant"):
        w = blend_weights((6, 16, 16), kind)
        assert w.min() > 0 and w.max() == pytest.approx(1.0)
        assert w[3, 8, 8] >= w[0, 0, 0]


def test_bad_grids() -> None:
    with pytest.raises(GeometryError, match="larger than twice the context"):
        PatchGrid((4, 16, 16), (2, 4, 4), (1, 1, 1), (10, 10, 10))
    with pytest.raises(GeometryError, match="stride"):
        PatchGrid((8, 16, 16), (1, 4, 4), (7, 4, 4), (10, 10, 10))


def test_output_dtypes() -> None:
    p = np.array([0.0, 0.5, 1.0, 1.2], np.float32)
    assert to_output_dtype(p, "uint8").tolist() == [0, 128, 255, 255]
    assert to_output_dtype(p, "float16").dtype == np.float16
    on_device = to_output_dtype(torch.from_numpy(p), "uint8")  # converted where the tensor is, then to the host
    assert isinstance(on_device, np.ndarray) and on_device.tolist() == [0, 128, 255, 255]
    assert to_output_dtype(torch.from_numpy(p), "float16").dtype == np.float16
