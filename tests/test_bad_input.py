"""Bad input is loud: missing chunks, NaN/inf and out-of-range floats, wrong voxel sizes and scale levels."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import em_like, write_raw
from daisy import Roi
from pydantic import ValidationError

from pipeline.config.network import NetworkConfig
from pipeline.config.segment import SegmentConfig
from pipeline.errors import ConfigError, ModelLoadError, StorageError
from pipeline.geometry import chunk_rois
from pipeline.network.checkpoint import (
    average_checkpoints,
    checkpoint_info,
    export_checkpoint,
    load_checkpoint,
    save_checkpoint,
    shipped_checkpoints,
    trained_voxel_size,
)
from pipeline.network.inputs import InputChecks, check_voxel_size, scale_input
from pipeline.network.model import build_network
from pipeline.segment import prepare, segment
from pipeline.viewing.pyramid import add_pyramid
from pipeline.volumes import Volume, VolumeMeta, create_volume, open_volume, volume_exists


def _save(path: Path, **extra: object) -> str:
    cfg = NetworkConfig(widths=[4, 8], context=(1, 4, 4), embedding_dim=8)
    return save_checkpoint(path, network_config=cfg, state_dict=build_network(cfg).state_dict(), **extra)  # type: ignore[arg-type]


def test_a_checkpoint_records_the_voxel_size_it_was_trained_at(tmp_path: Path) -> None:
    _save(tmp_path / "plain.pt", patch_shape=(8, 32, 32))
    _save(tmp_path / "sized.pt", patch_shape=(8, 32, 32), voxel_size_nm=(30, 4, 4.5))
    assert load_checkpoint(tmp_path / "plain.pt").voxel_size_nm is None
    assert load_checkpoint(tmp_path / "sized.pt").voxel_size_nm == (30.0, 4.0, 4.5)
    assert checkpoint_info(tmp_path / "sized.pt")["voxel_size_nm"] == [30.0, 4.0, 4.5]


def test_the_shipped_checkpoints_were_trained_at_5_nm() -> None:
    for name in shipped_checkpoints():
        assert load_checkpoint(name).voxel_size_nm == (5.0, 5.0, 5.0), name


@pytest.mark.parametrize("size", [(5, 5), (0, 5, 5), (-1, 5, 5), ("a", 5, 5), (float("nan"), 5, 5)])
def test_a_voxel_size_that_is_not_three_positive_numbers_is_refused(tmp_path: Path, size: tuple) -> None:
    with pytest.raises(ModelLoadError, match=r"voxel size .* \(z, y, x\) in nm"):
        _save(tmp_path / "bad.pt", voxel_size_nm=size)


# --- intensities: NaN, infinity and ranges -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "input_range", "pattern"),
    [
        (np.array([0.1, np.nan], np.float32), None, r"region 7 holds 1 NaN or infinite voxel"),
        (np.array([0.1, np.inf, -np.inf], np.float32), None, r"holds 2 NaN or infinite voxel"),
        (np.array([0.0, 255.0], np.float32), None, r"float32 values from 0 to 255; .*input_range: \[0, 255\]"),
        (np.array([-0.5, 0.5], np.float16), None, r"float16 values from -0.5 to 0.5; .*set input_range"),
        (np.array([0.0, 300.0], np.float32), (0, 255), r"input_range \[0, 255\] must cover every value: widen it"),
        (np.array([10, 5000], np.uint16), (0, 4095), r"uint16 values from 10 to 5000; .*widen it"),
    ],
)
def test_bad_intensities_are_refused_naming_the_region(raw: np.ndarray, input_range: Any, pattern: str) -> None:
    with pytest.raises(StorageError, match=pattern):
        scale_input(raw, input_range, where="region 7")


@pytest.mark.parametrize(
    ("raw", "input_range", "expected"),
    [
        (np.array([0, 51, 255], np.uint8), None, [0.0, 0.2, 1.0]),  # integers: unchanged contract
        (np.array([0, 65535], np.uint16), None, [0.0, 1.0]),
        (np.array([0.0, 0.25, 1.0], np.float32), None, [0.0, 0.25, 1.0]),
        (np.array([0.0, 51.0, 255.0], np.float32), (0, 255), [0.0, 0.2, 1.0]),
        (np.array([100, 4095], np.uint16), (100, 4095), [0.0, 1.0]),
    ],
)
def test_intensities_in_range_are_scaled(raw: np.ndarray, input_range: Any, expected: list[float]) -> None:
    got = scale_input(raw, input_range)
    assert got.dtype == np.float32 and np.allclose(got, expected)


def test_input_range_must_increase() -> None:
    with pytest.raises(ValidationError, match="input_range is .*low < high"):
        SegmentConfig(input="a", output="b", input_range=(255, 0))


# --- chunks missing from storage -------------------------------------------------------------------------------

MISSING = Roi((8, 16, 0), (8, 16, 16))  # one chunk of (8, 16, 16), never written
WHOLE = Roi((0, 0, 0), (16, 32, 32))


def _with_a_hole(url: str, shards: tuple[int, int, int] | None = None) -> Volume:
    meta = VolumeMeta(shape=WHOLE.shape, dtype=np.dtype(np.uint8), chunks=(8, 16, 16), voxel_size_nm=(5, 5, 5))
    volume = create_volume(url, meta.derive(shards=shards))
    data = em_like(WHOLE.shape, seed=3)[None] | 1  # no chunk holds only the fill value
    unit = shards or meta.chunks
    for cell in chunk_rois(WHOLE, unit):
        if not cell.intersects(MISSING):
            volume.write(cell, data[(slice(None), *cell.to_slices())])
    return open_volume(url)


@pytest.mark.parametrize(
    ("kind", "shards"), [("zarr", None), ("zarr2", None), ("zarr3", (8, 16, 16)), ("precomputed", None)]
)
def test_a_missing_input_chunk_is_named_unless_fill_missing(tmp_path: Path, kind: str, shards: Any) -> None:
    suffix = "/v" if kind == "precomputed" else "/v.zarr/raw"
    volume = _with_a_hole(f"{kind}://file://{tmp_path}{suffix}", shards)
    assert volume.missing_chunks(WHOLE) == [MISSING]
    assert volume.missing_chunks(Roi((0, 0, 0), (8, 32, 32))) == []
    with pytest.raises(
        StorageError,
        match=r"has no stored chunk 8,16,0:8,16,16 .*needed for region 4,0,0:8,32,32.*"
        r"set fill_missing: true",
    ):
        InputChecks().reader(volume)(Roi((4, 0, 0), (8, 32, 32)))
    filled = InputChecks(fill_missing=True).reader(volume)(WHOLE)
    assert not filled[(slice(None), *MISSING.to_slices())].any() and np.count_nonzero(filled == 0) == MISSING.size


def test_a_missing_chunk_in_a_sharded_precomputed_input_is_named(tmp_path: Path) -> None:
    volume = _with_a_hole(f"precomputed://file://{tmp_path}/v", None)
    sharded = VolumeMeta(shape=(16, 32, 32), dtype=np.dtype(np.uint8), chunks=(8, 8, 8), shards=(8, 16, 16))
    target = create_volume(f"precomputed://file://{tmp_path}/s", sharded)
    target.write(Roi((0, 0, 0), (8, 16, 16)), volume.read(Roi((0, 0, 0), (8, 16, 16))))
    target = open_volume(f"precomputed://file://{tmp_path}/s")
    assert target.missing_chunks(Roi((0, 0, 0), (8, 16, 16))) == []
    assert target.missing_chunks(Roi((0, 8, 8), (8, 16, 8))) == [Roi((0, 16, 8), (8, 8, 8))]


# --- voxel size --------------------------------------------------------------------------------------------------


def _input_at(tmp_path: Path, voxel_size_nm: tuple[float, float, float] | None) -> Volume:
    """A small input recording `voxel_size_nm`, or (None) a plain zarr array that records no voxel size."""
    if voxel_size_nm is None:
        zarr.create_array(str(tmp_path / "plain.zarr"), shape=(8, 16, 16), chunks=(8, 16, 16), dtype="uint8")
        return open_volume(f"zarr://file://{tmp_path}/plain.zarr")
    meta = VolumeMeta(shape=(8, 16, 16), dtype=np.dtype(np.uint8), chunks=(8, 16, 16), voxel_size_nm=voxel_size_nm)
    return create_volume(f"zarr://file://{tmp_path}/v.zarr/raw", meta)


@pytest.mark.parametrize(
    ("found", "trained", "tolerance", "pattern"),
    [
        ((50, 4.6, 4.6), (5, 5, 5), 0.25, r"voxels of 50 x 4.6 x 4.6 nm .*trained at 5 x 5 x 5 nm .*900% off along z"),
        (
            (5, 5, 8),
            (5, 5, 5),
            0.25,
            r"60% off along x, more than voxel_size_tolerance 0.25.*not supported yet: resample the input",
        ),
        ((8, 4, 4), (5, 5, 5), 0.5, r"60% off along z, more than voxel_size_tolerance 0.5"),
    ],
)
def test_an_input_far_from_the_networks_voxel_size_is_refused(
    tmp_path: Path, found: Any, trained: Any, tolerance: float, pattern: str
) -> None:
    _save(tmp_path / "c.pt", patch_shape=(8, 32, 32), voxel_size_nm=trained)
    with pytest.raises(ConfigError, match=pattern):
        check_voxel_size(_input_at(tmp_path, found), tmp_path / "c.pt", tolerance)


@pytest.mark.parametrize(
    ("found", "trained", "warning"),
    [
        ((6, 4.5, 5.5), (5, 5, 5), None),  # within 25 % on every axis
        ((8, 4, 4), None, "checkpoint .* records no voxel size"),
        (None, (5, 5, 5), "input .*plain.zarr records no voxel size"),
    ],
)
def test_a_close_or_unknown_voxel_size_passes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, found: Any, trained: Any, warning: str | None
) -> None:
    _save(tmp_path / "c.pt", patch_shape=(8, 32, 32), voxel_size_nm=trained)
    with caplog.at_level(logging.WARNING, logger="pipeline.network.inputs"):
        check_voxel_size(_input_at(tmp_path, found), tmp_path / "c.pt", 0.25)
    warned = [r.getMessage() for r in caplog.records]
    assert (warning is None and not warned) or (warning is not None and re.search(warning, warned[0])), warned


def test_segment_refuses_a_demo_input_at_another_voxel_size(tmp_path: Path) -> None:
    """The shipped demo network (5 nm) on the tests' 8 x 4 x 4 nm volume: refused before any block runs."""
    url = write_raw(f"zarr://file://{tmp_path}/em.zarr/raw", em_like((16, 32, 32)))
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    with pytest.raises(ConfigError, match=r"8 x 4 x 4 nm .*demo.pt was trained at 5 x 5 x 5 nm"):
        prepare(SegmentConfig(input=url, output=out, checkpoint="demo"))
    assert not volume_exists(out)


# --- end to end: segment runs --------------------------------------------------------------------------------------

SHAPE = (16, 64, 64)


def _run(client: Any, ckpt: Path, url: str, out: str, **kw: Any) -> Any:
    cfg = SegmentConfig(
        input=url,
        output=out,
        checkpoint=ckpt,
        block_size=(16, 32, 32),
        chunk_size=(8, 32, 32),
        pyramid=False,
        retries=0,
        **kw,
    )
    return segment(cfg, client=client, progress=False).run


def _float_input(tmp_path: Path, data: np.ndarray) -> str:
    meta = VolumeMeta(shape=data.shape, dtype=data.dtype, chunks=(8, 32, 32), voxel_size_nm=(8, 4, 4))
    url = f"zarr://file://{tmp_path}/f.zarr/raw"
    create_volume(url, meta).write(meta.roi, data[None])
    return url


def test_segment_fails_the_blocks_that_read_a_missing_chunk(client: Any, tiny_checkpoint: Path, tmp_path: Path) -> None:
    url = write_raw(f"zarr://file://{tmp_path}/em.zarr/raw", em_like((16, 128, 64)) | 1, chunks=(8, 32, 32))
    (tmp_path / "em.zarr" / "raw" / "s0" / "c" / "0" / "1" / "3" / "1").unlink()  # channel 0, z 8, y 96, x 32
    run = _run(client, tiny_checkpoint, url, f"zarr://file://{tmp_path}/p.zarr/probs")
    assert 0 < run.failed < run.total
    assert all("has no stored chunk 8,96,32:8,32,32" in f.error and "fill_missing" in f.error for f in run.failures)
    filled = _run(client, tiny_checkpoint, url, f"zarr://file://{tmp_path}/q.zarr/probs", fill_missing=True)
    assert filled.ok


def test_segment_fails_a_block_holding_nan(client: Any, tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = (em_like(SHAPE) / 255).astype(np.float32)
    data[3, 40, 50] = np.nan
    run = _run(client, tiny_checkpoint, _float_input(tmp_path, data), f"zarr://file://{tmp_path}/p.zarr/probs")
    assert 0 < run.failed < run.total
    assert all(re.search(r"input .*f.zarr/raw region \S+ holds 1 NaN", f.error) for f in run.failures), run.failures


def test_float_input_in_0_255_is_refused_or_mapped_by_input_range(
    client: Any, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    raw = em_like(SHAPE)
    url = _float_input(tmp_path, raw.astype(np.float32))
    refused = _run(client, tiny_checkpoint, url, f"zarr://file://{tmp_path}/p.zarr/probs")
    assert refused.failed == refused.total and "set input_range" in refused.failures[0].error
    mapped = f"zarr://file://{tmp_path}/m.zarr/probs"
    assert _run(client, tiny_checkpoint, url, mapped, input_range=(0, 255)).ok
    reference = f"zarr://file://{tmp_path}/r.zarr/probs"
    assert _run(client, tiny_checkpoint, write_raw(f"zarr://file://{tmp_path}/u.zarr/raw", raw), reference).ok
    np.testing.assert_array_equal(_read(mapped), _read(reference))


def _read(url: str, scale: int = 0) -> np.ndarray:
    volume = open_volume(url, scale=scale)
    return volume.read(volume.meta.roi)


@pytest.mark.parametrize("url", ["zarr://file://{}/em.zarr", "precomputed://file://{}/em"])
def test_input_scale_reads_that_level(client: Any, tiny_checkpoint: Path, tmp_path: Path, url: str) -> None:
    """A run on level 1 of a multiscale input (OME-Zarr level, precomputed mip) equals a run on a plain volume
    holding level 1 (grid, voxel size and offset included); before, workers read level 0 under level 1's plan."""
    meta = VolumeMeta(shape=(16, 128, 128), dtype=np.dtype(np.uint8), chunks=(8, 32, 32), voxel_size_nm=(8, 4, 4))
    url = url.format(tmp_path)
    create_volume(url, meta.derive(voxel_offset=(3, 10, 20))).write(meta.roi, em_like(meta.shape)[None])
    add_pyramid(client, url, progress=False)
    level = open_volume(url, scale=1).meta
    assert (level.shape, level.voxel_size_nm, level.voxel_offset) == ((16, 64, 64), (8, 8, 8), (3, 5, 10))
    _save(tmp_path / "c8.pt", patch_shape=(8, 32, 32), voxel_size_nm=(8, 8, 8))
    with pytest.raises(ConfigError, match=r"50% off along y.*read level 1 with input_scale: 1"):
        check_voxel_size(open_volume(url), tmp_path / "c8.pt", 0.25)
    check_voxel_size(open_volume(url, scale=1), tmp_path / "c8.pt", 0.25)
    copy = f"zarr://file://{tmp_path}/level1.zarr/raw"
    create_volume(copy, level).write(level.roi, _read(url, scale=1))
    scaled, plain = f"zarr://file://{tmp_path}/s.zarr/probs", f"zarr://file://{tmp_path}/c.zarr/probs"
    assert _run(client, tiny_checkpoint, url, scaled, input_scale=1).ok
    assert _run(client, tiny_checkpoint, copy, plain).ok
    out = open_volume(scaled).meta
    assert (out.shape, out.voxel_size_nm, out.voxel_offset) == (level.shape, level.voxel_size_nm, level.voxel_offset)
    np.testing.assert_array_equal(_read(scaled), _read(plain))


def test_export_and_average_keep_the_voxel_size(tmp_path: Path) -> None:
    _save(tmp_path / "a.pt", patch_shape=(8, 32, 32), voxel_size_nm=(30, 4, 4))
    export_checkpoint(tmp_path / "a.pt", tmp_path / "e.pt")
    average_checkpoints([tmp_path / "a.pt", tmp_path / "a.pt"], tmp_path / "s.pt")
    assert load_checkpoint(tmp_path / "e.pt").voxel_size_nm == (30.0, 4.0, 4.0)
    assert trained_voxel_size(tmp_path / "s.pt") == (30.0, 4.0, 4.0)
