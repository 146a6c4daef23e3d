"""The worker's tile cache: neighbouring blocks share the tiles that straddle their border, with the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import em_like, write_raw

import workers.tile_cache as tile_cache
from pipeline.config.segment import SegmentConfig
from pipeline.segment import prepare
from pipeline.volumes import open_volume
from workers.patch_predictor import Predictor
from workers.predict_block import predict_block
from workers.tile_cache import TileCache


def test_a_patch_seen_before_is_not_computed_again() -> None:
    calls = []

    def tile(patch: np.ndarray) -> np.ndarray:
        calls.append(1)
        return patch[:, 1:-1] * 2

    cache = TileCache(max_bytes=10 * 4 * 8)  # room for 10 results of 8 float32
    cached = cache.wrap(tile, "job")
    a, b = np.ones((1, 3, 8), np.float32), np.zeros((1, 3, 8), np.float32)
    first = cached(a)
    assert cached(a.copy()) is first and len(calls) == 1  # keyed by content, not by the array
    assert not first.flags.writeable  # shared: no block may change it
    cached(b)
    cache.wrap(tile, "another job")(a)
    assert len(calls) == 3 and (cache.hits, cache.misses) == (1, 3)


def test_the_oldest_tiles_go_first_and_size_zero_turns_it_off() -> None:
    calls = []

    def tile(patch: np.ndarray) -> np.ndarray:
        calls.append(int(patch[0, 0]))
        return patch.astype(np.float32)

    cached = TileCache(max_bytes=2 * 4).wrap(tile, "job")  # two one-voxel tiles
    for value in (1, 2, 3, 1):
        cached(np.full((1, 1), value))
    assert calls == [1, 2, 3, 1]  # 1 was dropped when 3 came
    off = TileCache(0)
    assert off.wrap(tile, "job") is tile


@pytest.fixture
def raw_url(tmp_path: Path) -> str:
    return write_raw(f"zarr://file://{tmp_path}/em.zarr/raw", em_like((16, 48, 48), seed=3), chunks=(4, 8, 8))


def test_blocks_share_straddling_tiles_and_write_the_same_bytes(raw_url, tiny_checkpoint, tmp_path, monkeypatch):
    predictor = Predictor(str(tiny_checkpoint), device="cpu")
    written = {}
    for name, megabytes in (("off", 0), ("on", 64)):
        monkeypatch.setattr(tile_cache, "_worker_cache", TileCache(megabytes * 2**20))
        out = f"zarr://file://{tmp_path}/{name}.zarr/p"
        config = SegmentConfig(
            input=raw_url, output=[out], checkpoint=tiny_checkpoint, block_size=(8, 16, 16), chunk_size=(4, 8, 8),
            overlap=0.25, median_size=3, pyramid=False,
        )  # fmt: skip
        run = prepare(config)
        for block in run.plan.blocks():
            predict_block(block, job=run.job, predictor=predictor)
        written[name] = open_volume(out).read(open_volume(out).meta.roi)
        cache = tile_cache.worker_tile_cache()
        if name == "on":
            tiles = sum(1 for block in run.plan.blocks() for _ in run.job.grid.tiles(block.write_roi))
            assert cache.misses + cache.hits == tiles and cache.hits > tiles // 3  # straddling tiles shared
    np.testing.assert_array_equal(written["on"], written["off"])
