"""Pyramids: level geometry by hand, the reductions on tiny arrays, blockwise levels against a whole-array oracle."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.viewing.pyramid import Level, add_pyramid, downsample, pyramid_levels
from pipeline.volumes import VolumeMeta, create_volume, open_volume


def test_levels_anisotropic_stop_at_few_chunks() -> None:
    assert pyramid_levels((32, 96, 96), (16, 32, 32), (30.0, 8.0, 8.0)) == [
        Level(1, (1, 2, 2), (1, 2, 2), (32, 48, 48))
    ]


def test_levels_make_anisotropic_data_isotropic_first() -> None:
    levels = pyramid_levels((64, 1024, 1024), (8, 64, 64), (30.0, 8.0, 8.0), min_chunks_across=1)
    assert [lv.factor for lv in levels] == [(1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert [lv.shape for lv in levels] == [(64, 512, 512), (32, 256, 256), (16, 128, 128), (8, 64, 64)]


def test_levels_isotropic_and_none_needed() -> None:
    levels = pyramid_levels((100, 100, 100), (10, 10, 10), (4.0, 4.0, 4.0))
    assert [lv.shape for lv in levels] == [(50, 50, 50), (25, 25, 25), (13, 13, 13)]
    assert levels[-1].total_factor == (8, 8, 8)
    assert pyramid_levels((16, 32, 32), (16, 32, 32), (1.0, 1.0, 1.0)) == []


def test_levels_on_the_absolute_grid_of_an_offset_volume() -> None:
    levels = pyramid_levels((4, 4, 5), (2, 2, 2), (1.0, 1.0, 1.0), min_chunks_across=1, voxel_offset=(0, 2, 3))
    assert levels[0] == Level(1, (2, 2, 2), (2, 2, 2), (2, 2, 3), voxel_offset=(0, 1, 1), phase=(0, 0, 1))
    assert levels[1:] == [Level(2, (2, 2, 2), (4, 4, 4), (1, 2, 2), voxel_offset=(0, 0, 0), phase=(0, 1, 1))]


def test_levels_of_a_sharded_volume_keep_the_shard_shape_clipped_to_whole_chunks() -> None:
    levels = pyramid_levels((32, 96, 96), (8, 16, 16), (1.0, 1.0, 1.0), min_chunks_across=1, shards=(16, 64, 32))
    assert [lv.shape for lv in levels] == [(16, 48, 48), (8, 24, 24), (4, 12, 12)]
    assert [lv.shards for lv in levels] == [(16, 48, 32), (8, 32, 32), (8, 16, 16)]
    assert all(lv.shards is None for lv in pyramid_levels((32, 96, 96), (8, 16, 16), (1.0, 1.0, 1.0)))


def test_windows_start_before_the_data_by_the_phase() -> None:
    data = np.array([4, 6, 8], dtype=np.uint8).reshape(1, 1, 1, 3)
    assert downsample(data, (1, 1, 2), "mean", (0, 0, 1)).ravel().tolist() == [4, 7]
    labels = np.array([1, 2, 2], dtype=np.uint64).reshape(1, 1, 1, 3)
    assert downsample(labels, (1, 1, 2), "mode", (0, 0, 1)).ravel().tolist() == [1, 2]


def test_mean_uses_only_voxels_inside_the_volume() -> None:
    data = np.array([1, 3, 5], dtype=np.uint8).reshape(1, 1, 1, 3)
    assert downsample(data, (1, 1, 2), "mean").ravel().tolist() == [2, 5]
    floats = np.array([0.0, 0.5, 1.0], dtype=np.float32).reshape(1, 1, 1, 3)
    assert downsample(floats, (1, 1, 2), "mean").ravel().tolist() == [0.25, 1.0]


def test_mode_picks_most_frequent_label_and_ignores_padding() -> None:
    data = np.array([[7, 7], [3, 9]], dtype=np.uint64).reshape(1, 1, 2, 2)
    assert downsample(data, (1, 2, 2), "mode").ravel().tolist() == [7]
    tie = np.array([[4, 2], [2, 4]], dtype=np.uint64).reshape(1, 1, 2, 2)
    assert downsample(tie, (1, 2, 2), "mode").ravel().tolist() == [4]
    edge = np.array([5, 5, 0], dtype=np.uint32).reshape(1, 1, 1, 3)
    assert downsample(edge, (1, 1, 2), "mode").ravel().tolist() == [5, 0]


def _oracle_levels(data: np.ndarray, levels: list[Level], method: str) -> list[np.ndarray]:
    out = [data]
    for level in levels:
        out.append(downsample(out[-1], level.factor, method, level.phase))  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize(
    ("scheme", "layer_type", "dtype", "channels"),
    [
        ("precomputed", "image", np.uint8, 2),
        ("zarr", "image", np.uint8, 2),
        ("precomputed", "segmentation", np.uint64, 1),
        ("zarr", "segmentation", np.uint64, 1),
    ],
)
def test_blockwise_pyramid_equals_whole_volume(
    client: Any, tmp_path: Any, scheme: str, layer_type: str, dtype: type, channels: int
) -> None:
    shape, chunks = (20, 90, 70), (8, 16, 16)  # not divisible by the blocks or by 2
    rng = np.random.default_rng(1)
    data: np.ndarray
    if layer_type == "image":
        data = rng.integers(0, 256, size=(channels, *shape)).astype(dtype)
    else:
        data = (rng.integers(0, 4, size=(1, *shape)) * 1000 + 2**40).astype(dtype)
    meta = VolumeMeta(
        shape=shape,
        dtype=np.dtype(dtype),
        chunks=chunks,
        num_channels=channels,
        voxel_size_nm=(8.0, 4.0, 4.0),
        voxel_offset=(2, 4, 6),
        layer_type=layer_type,  # type: ignore[arg-type]
    )
    url = f"{scheme}://file://{tmp_path}/{'v.zarr/' if scheme == 'zarr' else ''}vol"
    create_volume(url, meta).write(meta.roi, data)

    result = add_pyramid(client, url, min_chunks_across=1, block_shape=(8, 32, 16), progress=False)

    assert result.ok and len(result.levels) >= 2
    method = "mode" if layer_type == "segmentation" else "mean"
    expected = _oracle_levels(data, result.levels, method)
    for level in result.levels:
        volume = open_volume(url, scale=level.index)
        assert volume.meta.shape == level.shape
        assert volume.meta.voxel_size_nm == tuple(
            r * f for r, f in zip((8.0, 4.0, 4.0), level.total_factor, strict=True)
        )
        np.testing.assert_array_equal(volume.read(volume.meta.roi), expected[level.index])
    again = add_pyramid(client, url, min_chunks_across=1, block_shape=(8, 32, 16), progress=False)
    assert again.levels == result.levels


@pytest.mark.parametrize(
    ("scheme", "layer_type", "dtype"),
    [("zarr3", "image", np.uint8), ("precomputed", "image", np.uint8), ("precomputed", "segmentation", np.uint64)],
)
def test_a_sharded_pyramid_equals_the_unsharded_one_bit_for_bit(
    client: Any, tmp_path: Any, scheme: str, layer_type: str, dtype: type
) -> None:
    """Shards of 2 x 2 x 2 chunks at level 0; coarser levels clip them on some axes (a 2 x 1 x 2 Morton box at s2)."""
    shape, chunks, shards = (20, 40, 150), (8, 16, 16), (16, 32, 32)
    data = (np.random.default_rng(2).integers(0, 4, size=(1, *shape)) * 60).astype(dtype)
    meta = VolumeMeta(shape, np.dtype(dtype), chunks, 1, (8.0, 4.0, 4.0), (2, 4, 6), layer_type)  # type: ignore[arg-type]
    zarr = "zarr3" if scheme == "zarr3" else None
    url = {name: f"{scheme}://file://{tmp_path}/{name}{'.zarr/vol' if zarr else ''}" for name in ("plain", "sharded")}
    create_volume(url["plain"], meta).write(meta.roi, data)
    create_volume(url["sharded"], meta.derive(shards=shards)).write(meta.roi, data)

    plain = add_pyramid(client, url["plain"], min_chunks_across=1, block_shape=(8, 32, 16), progress=False)
    sharded = add_pyramid(client, url["sharded"], min_chunks_across=1, block_shape=(8, 32, 16), progress=False)

    assert plain.ok and sharded.ok and len(sharded.levels) == 4
    assert [lv.shards for lv in sharded.levels] == [(16, 32, 32), (16, 16, 32), (8, 16, 32), (8, 16, 16)]
    for level in sharded.levels:
        expected = open_volume(url["plain"], scale=level.index)
        volume = open_volume(url["sharded"], scale=level.index)
        assert volume.meta.shards == level.shards and expected.meta.shards is None
        np.testing.assert_array_equal(volume.read(volume.meta.roi), expected.read(expected.meta.roi))
        assert volume.missing_chunks(volume.meta.roi) == []  # every shard written, by one block


def test_plain_zarr_array_is_refused(client: Any, tmp_path: Any) -> None:
    import zarr

    from pipeline.errors import StorageError

    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(64, 64, 64), chunks=(16, 16, 16), dtype="uint8")
    with pytest.raises(StorageError, match="not an OME-Zarr group with axes c, z, y, x"):
        add_pyramid(client, f"zarr://file://{tmp_path}/plain.zarr", min_chunks_across=1, progress=False)


@pytest.mark.cluster
def test_pyramid_and_meshes_on_two_worker_processes(tmp_path: Any) -> None:
    from pipeline.cluster import dask_client
    from pipeline.config.cluster import LocalClusterConfig
    from pipeline.viewing.meshes import add_meshes

    shape = (16, 64, 48)
    labels = np.zeros(shape, dtype=np.uint64)
    labels[2:14, 10:50, 5:40] = 3
    meta = VolumeMeta(shape=shape, dtype=np.dtype(np.uint64), chunks=(8, 16, 16), layer_type="segmentation")
    url = f"zarr://file://{tmp_path}/v.zarr/instances"
    create_volume(url, meta).write(meta.roi, labels[None])
    with dask_client(LocalClusterConfig(workers=2)) as client:
        pyramid = add_pyramid(client, url, min_chunks_across=1, block_shape=(8, 16, 16), progress=False)
        meshes = add_meshes(client, url, block_shape=(8, 32, 16), progress=False)
    assert pyramid.ok and meshes.ok and meshes.sizes == {3: int((labels == 3).sum())}
    expected = _oracle_levels(labels[None], pyramid.levels, "mode")
    for level in pyramid.levels:
        volume = open_volume(url, scale=level.index)
        np.testing.assert_array_equal(volume.read(volume.meta.roi), expected[level.index])
