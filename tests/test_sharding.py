"""Sharded outputs (zarr v3 sharding, precomputed sharded) of segment and instances, with their pyramids: same
voxels as unsharded ones, far fewer files, and layouts that blocks cannot write safely are refused."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import em_like, write_raw
from daisy import Roi
from pydantic import ValidationError

from pipeline.config.instances import DecodeConfig, InstancesConfig
from pipeline.errors import GeometryError, StorageError
from pipeline.geometry import grid_shape, morton_box
from pipeline.instances.run import block_shape_for, prepare_instances, run_instances
from pipeline.plan import plan_blocks
from pipeline.viewing.pyramid import downsample
from pipeline.volumes import VolumeMeta, create_volume, open_volume

SHAPE = (16, 48, 40)
META = VolumeMeta(shape=SHAPE, dtype=np.dtype(np.uint8), chunks=(4, 8, 8), num_channels=2, shards=(8, 16, 16))


def files_under(path: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(path))


@pytest.mark.parametrize(("grid", "bits", "box"), [((4, 4, 4), 1, (1, 1, 2)), ((4, 4, 4), 3, (2, 2, 2)),
                                                  ((1, 4, 4), 3, (1, 2, 4)), ((3, 1, 2), 2, (2, 1, 2)),
                                                  ((2, 2, 2), 9, (2, 2, 2))])  # fmt: skip
def test_morton_box_by_hand(grid: tuple[int, int, int], bits: int, box: tuple[int, int, int]) -> None:
    assert morton_box(grid, bits) == box


@pytest.mark.parametrize(("grid", "bits"), [((4, 6, 5), 3), ((2, 8, 3), 4), ((5, 3, 7), 2), ((1, 6, 6), 5)])
def test_morton_box_is_what_cloud_volume_puts_in_one_shard(grid: tuple[int, int, int], bits: int) -> None:
    """Chunks whose compressed Morton codes agree above `bits` form aligned boxes of `morton_box` chunks."""
    from cloudvolume.datasource.precomputed.common import compressed_morton_code

    box = morton_box(grid, bits)
    points = list(itertools.product(*(range(n) for n in grid)))  # (z, y, x)
    codes = compressed_morton_code([p[::-1] for p in points], grid[::-1])  # cloud-volume counts (x, y, z)
    for point, code in zip(points, codes, strict=True):
        same_box = tuple(p // b for p, b in zip(point, box, strict=True))
        for other, other_code in zip(points, codes, strict=True):
            if tuple(o // b for o, b in zip(other, box, strict=True)) == same_box:
                assert int(code) >> bits == int(other_code) >> bits


@pytest.mark.parametrize(
    ("kind", "layer", "dtype"),
    [("zarr3", "image", np.uint8), ("precomputed", "image", np.uint8), ("precomputed", "segmentation", np.uint64)],
)
def test_blocks_of_whole_shards_write_what_they_read(tmp_path: Path, kind: str, layer: str, dtype: type) -> None:
    channels = 2 if layer == "image" else 1
    meta = META.derive(dtype=dtype, layer_type=layer, num_channels=channels, shards=META.shards)
    data = np.random.default_rng(0).integers(0, 255, size=(channels, *SHAPE)).astype(dtype)
    path = tmp_path / "out"
    volume = create_volume(f"{kind}://{path}", meta)
    assert volume.meta.shards == (8, 16, 16)
    for block in plan_blocks(SHAPE, meta.chunks, (8, 16, 16), shard_shape=volume.meta.shards).blocks():
        volume.write(block.write_roi, data[(slice(None), *block.write_roi.to_slices())])
    reopened = open_volume(f"{kind}://{path}")
    assert reopened.meta.shards == (8, 16, 16)
    assert np.array_equal(reopened.read(reopened.meta.roi), data)
    shards = int(np.prod(grid_shape(SHAPE, (8, 16, 16))))
    assert files_under(path) <= shards + 3 < int(np.prod(grid_shape(SHAPE, meta.chunks)))  # + metadata files
    part = Roi((2, 3, 5), (5, 9, 7))  # a region-of-interest border: parts of several shards
    open_volume(f"{kind}://{path}", mode="r+").write(part, np.zeros((channels, *part.shape), dtype))
    data[(slice(None), *part.to_slices())] = 0
    assert np.array_equal(open_volume(f"{kind}://{path}").read(reopened.meta.roi), data)


@pytest.mark.parametrize(
    ("url", "shards", "error", "pattern"),
    [
        ("zarr2://{}/v.zarr", (8, 16, 16), StorageError, "zarr v2 has no sharding"),
        ("zarr3://{}/v.zarr", (6, 16, 16), GeometryError, "shard shape .* whole number of output chunks"),
        ("precomputed://{}/v", (4, 16, 8), GeometryError, r"Morton order .* e\.g\. \(4, 8, 16\)"),
        ("precomputed://{}/v", (12, 16, 16), GeometryError, "not possible"),
    ],
)
def test_impossible_shards_are_refused(tmp_path: Path, url: str, shards: tuple, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        create_volume(url.format(tmp_path), META.derive(shards=shards))


def test_a_hashed_precomputed_sharding_is_read_but_never_written(tmp_path: Path) -> None:
    from cloudvolume import CloudVolume

    volume = create_volume(f"precomputed://{tmp_path}/v", META)
    volume.write(META.roi, np.ones((2, *SHAPE), np.uint8))
    info = CloudVolume(f"file://{tmp_path}/v").info
    info["scales"][0]["sharding"]["hash"] = "murmurhash3_x86_128"
    CloudVolume(f"file://{tmp_path}/v", info=info).commit_info()
    assert open_volume(f"precomputed://{tmp_path}/v").meta.shards is None
    with pytest.raises(StorageError, match="not boxes of chunks"):
        open_volume(f"precomputed://{tmp_path}/v", mode="r+")


def test_derived_metadata_is_unsharded_unless_asked() -> None:
    assert META.derive(dtype=np.uint64).shards is None and META.derive().write_unit == META.chunks
    assert META.write_unit == (8, 16, 16)


def _segment(tmp_path: Path, name: str, job: str) -> subprocess.CompletedProcess:
    (tmp_path / f"{name}.yaml").write_text(job)
    cmd = [sys.executable, "-m", "pipeline", "segment", str(tmp_path / f"{name}.yaml")]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.cluster
def test_sharded_segment_outputs_equal_unsharded_ones_bit_for_bit(tmp_path: Path, tiny_checkpoint: Path) -> None:
    raw = write_raw(f"{tmp_path}/em.zarr/raw", em_like((16, 64, 64)))
    common = (
        f"input: {raw}\ncheckpoint: {tiny_checkpoint}\nblock_size: [16, 32, 32]\nchunk_size: [8, 16, 16]\n"
        "workers: 1\ndevice: cpu\n"
    )
    plain = _segment(tmp_path, "plain", common + "pyramid: false\noutput: [plain.zarr/p, precomputed://plain_p]\n")
    assert plain.returncode == 0, plain.stderr
    sharded = common + "shard_size: [16, 32, 32]\noutput: [zarr3://sharded.zarr/p, precomputed://sharded_p]\n"
    run = _segment(tmp_path, "sharded", sharded)
    assert run.returncode == 0, run.stderr
    expected = open_volume(f"{tmp_path}/plain.zarr/p").read(Roi((0, 0, 0), (16, 64, 64)))
    assert expected.any()
    for url in (f"zarr3://{tmp_path}/sharded.zarr/p", f"precomputed://{tmp_path}/sharded_p"):
        volume = open_volume(url)
        assert volume.meta.shards == (16, 32, 32)
        assert np.array_equal(volume.read(volume.meta.roi), expected), url
        level = open_volume(url, scale=1)  # the pyramid (x, y halved) is sharded like scale 0
        assert level.meta.shards == (16, 32, 32)
        assert np.array_equal(level.read(level.meta.roi), downsample(expected, (1, 2, 2), "mean")), url
    assert np.array_equal(open_volume(f"precomputed://{tmp_path}/plain_p").read(Roi((0, 0, 0), (16, 64, 64))), expected)
    key = json.loads((tmp_path / "sharded_p" / "info").read_text())["scales"][0]["key"]
    assert files_under(tmp_path / "sharded_p" / key) == 4 < files_under(tmp_path / "plain_p" / key)  # 4 shards
    # blocks smaller than the shards of the existing outputs would each rewrite whole shards: refused
    smaller = sharded.replace("block_size: [16, 32, 32]", "block_size: [16, 16, 16]")
    for job in (smaller.replace("shard_size: [16, 32, 32]\n", ""), smaller):  # the outputs' own shards; the job's
        refused = _segment(tmp_path, "smaller", job)
        assert refused.returncode == 2 and "whole number of output shards" in refused.stderr, refused.stderr


def test_a_precomputed_shard_past_the_volume_end_is_the_whole_axis(tmp_path: Path) -> None:
    meta = VolumeMeta(shape=(4, 8, 40), dtype=np.dtype(np.uint8), chunks=(4, 8, 8), shards=(4, 8, 40))
    volume = create_volume(f"precomputed://{tmp_path}/v", meta)  # 5 chunks along x: one shard of 8 holds them
    assert volume.cv.scale["sharding"]["preshift_bits"] == 3 and volume.meta.shards == (4, 8, 40)
    data = np.arange(4 * 8 * 40, dtype=np.uint8).reshape(1, 4, 8, 40)
    (block,) = plan_blocks(meta.shape, meta.chunks, (4, 8, 40), shard_shape=volume.meta.shards).blocks()
    volume.write(block.write_roi, data)
    assert np.array_equal(open_volume(f"precomputed://{tmp_path}/v").read(meta.roi), data)
    assert files_under(tmp_path / "v" / volume.cv.key) == 1


def _mask_probabilities(tmp_path: Path) -> str:
    """A one-channel uint8 probability volume over SHAPE in META's chunks: smooth blobs crossing every block face."""
    url = f"{tmp_path}/probs.zarr"
    meta = META.derive(num_channels=1)
    create_volume(url, meta).write(meta.roi, em_like(SHAPE, seed=1)[None])
    return url


def test_sharded_instance_labels_and_their_pyramids_equal_unsharded_ones_bit_for_bit(
    client: Any, tmp_path: Path
) -> None:
    source = _mask_probabilities(tmp_path)
    plain, sharded = f"zarr3://{tmp_path}/plain.zarr", [f"zarr3://{tmp_path}/s.zarr", f"precomputed://{tmp_path}/s"]
    decode = DecodeConfig(threshold=0.6, seed_threshold=0, min_size=0)  # 27 objects, many across blocks
    for url in (plain, *sharded):
        shards = None if url == plain else (8, 16, 16)
        cfg = InstancesConfig(
            input=source, output=url, block_size=(16, 32, 32), shard_size=shards, dtype="uint32", decode=decode,
            viewing=url != plain,  # the sharded labels' pyramid against a whole-array oracle of the plain labels
        )  # fmt: skip
        result = run_instances(cfg, client, progress=False)
        assert result.ok and result.num_objects == 27 and result.equivalences > 0, result.failures
        assert result.pyramid is not None or url == plain
    expected = [open_volume(plain).read(META.roi)]
    assert open_volume(plain).meta.shards is None and expected[0].max() == 27
    levels = result.pyramid.levels if result.pyramid else []
    for level in levels:
        expected.append(downsample(expected[-1], level.factor, "mode", level.phase))
    for url in sharded:
        for scale, shards in enumerate([(8, 16, 16), (8, 16, 16), (4, 16, 16)]):  # s2: 1 x 2 x 2 chunks, clipped
            volume = open_volume(url, scale=scale)
            assert volume.meta.shards == shards and volume.meta.dtype == np.uint32, (url, scale)
            assert np.array_equal(volume.read(volume.meta.roi), expected[scale]), (url, scale)
    key = open_volume(sharded[1]).cv.key
    assert files_under(tmp_path / "s" / key) == int(np.prod(grid_shape(SHAPE, (8, 16, 16)))) == 18  # 120 chunks


@pytest.mark.parametrize(
    ("output", "settings", "error", "pattern"),
    [
        ("zarr3://{}/l.zarr", {"shard_size": (6, 16, 16)}, GeometryError,
         r"shard_size \(6, 16, 16\) is not a whole number of output chunks"),
        ("zarr3://{}/l.zarr", {"shard_size": (8, 16, 16), "block_size": (8, 16, 8)}, GeometryError,
         r"block_size \(8, 16, 8\) is not a whole number of output shards \(shard_size\)"),
        ("precomputed://{}/l", {"shard_size": (4, 16, 8), "block_size": (4, 16, 8)}, GeometryError, "Morton order"),
        ("zarr2://{}/l.zarr", {"shard_size": (8, 16, 16)}, StorageError, "zarr v2 has no sharding"),
        ("zarr3://{}/l.zarr", {"shard_size": (0, 16, 16)}, ValidationError, "shard_size must be three positive"),
    ],
)  # fmt: skip
def test_impossible_label_shards_are_refused_before_any_work(
    tmp_path: Path, output: str, settings: dict, error: type, pattern: str
) -> None:
    source = _mask_probabilities(tmp_path)
    with pytest.raises(error, match=pattern):
        prepare_instances(InstancesConfig(input=source, output=output.format(tmp_path), **settings))
    assert not (tmp_path / "l").exists() and not (tmp_path / "l.zarr").exists()


def test_the_default_instance_block_is_whole_shards() -> None:
    assert block_shape_for(InstancesConfig(shard_size=(24, 96, 96)), (4, 8, 8)) == (72, 288, 288)
    assert block_shape_for(InstancesConfig(), (4, 8, 8)) == (64, 256, 256)
