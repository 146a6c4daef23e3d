"""One conformance suite run against every volume backend, plus the errors bad volumes give."""

from __future__ import annotations

import numpy as np
import pytest
from daisy import Roi

from pipeline.errors import ConfigError, GeometryError, StorageError
from pipeline.volumes import VolumeMeta, create_volume, open_volume, parse_volume_url

BACKENDS = [
    "zarr://file://{d}/v.zarr/x",
    "zarr2://file://{d}/v.zarr/x",
    "zarr3://file://{d}/v.zarr/x",
    "precomputed://file://{d}/layer",
    "{d}/plain.zarr/x",
]


@pytest.fixture(params=BACKENDS, ids=["zarr", "zarr2", "zarr3", "precomputed", "plain-path"])
def url(request: pytest.FixtureRequest, tmp_path) -> str:
    return request.param.format(d=tmp_path)


def meta(channels: int = 2, dtype: str = "uint8") -> VolumeMeta:
    return VolumeMeta(
        shape=(12, 20, 28),
        dtype=np.dtype(dtype),
        chunks=(4, 8, 8),
        num_channels=channels,
        voxel_size_nm=(30.0, 8.0, 8.0),
        voxel_offset=(3, 5, 7),
    )


class TestBackendConformance:
    def test_round_trip_whole_and_partial(self, url: str) -> None:
        m = meta()
        data = np.random.default_rng(0).integers(0, 255, (2, *m.shape), dtype=np.uint8)
        create_volume(url, m).write(m.roi, data)
        part = Roi((2, 3, 5), (5, 9, 11))
        patch = np.full((2, *part.shape), 7, np.uint8)
        open_volume(url, "r+").write(part, patch)
        data[:, 2:7, 3:12, 5:16] = 7
        back = open_volume(url)
        assert (back.read(m.roi) == data).all()
        assert (back.read(Roi((1, 1, 1), (3, 4, 5))) == data[:, 1:4, 1:5, 1:6]).all()

    def test_metadata_travels(self, url: str) -> None:
        create_volume(url, meta())
        got = open_volume(url).meta
        assert got.shape == (12, 20, 28) and got.num_channels == 2 and got.chunks == (4, 8, 8)
        assert got.voxel_size_nm == (30.0, 8.0, 8.0) and got.voxel_offset == (3, 5, 7)

    def test_float_and_uint64(self, url: str) -> None:
        for dtype in ("float32", "uint64"):
            m = meta(1, dtype)
            data = np.arange(np.prod(m.shape)).reshape(1, *m.shape).astype(dtype)
            create_volume(url, m).write(m.roi, data)
            assert (open_volume(url).read(m.roi) == data).all()

    def test_provenance(self, url: str) -> None:
        create_volume(url, meta())
        open_volume(url, "r+").set_provenance({"threshold": 0.7, "checkpoint_hash": "abc"})
        assert open_volume(url).provenance["threshold"] == 0.7

    def test_region_outside_is_refused(self, url: str) -> None:
        create_volume(url, meta())
        with pytest.raises(GeometryError, match="outside"):
            open_volume(url).read(Roi((10, 0, 0), (5, 5, 5)))

    def test_wrong_dtype_write_is_refused(self, url: str) -> None:
        m = meta(2)
        with pytest.raises(StorageError, match="float32"):
            create_volume(url, m).write(m.roi, np.zeros((2, *m.shape), np.float32))


def test_url_forms(tmp_path) -> None:
    assert parse_volume_url("precomputed://gs://bucket/layer").location == "gs://bucket/layer"
    assert parse_volume_url("zarr2://file:///a/b.zarr/raw").zarr_format == 2
    local = parse_volume_url("data/v.zarr/raw")
    assert local.kind == "zarr" and local.location.startswith("file:///")
    with pytest.raises(ConfigError, match="unsupported volume URL"):
        parse_volume_url("n5://file:///x")


def test_axis_order_from_attributes(tmp_path) -> None:
    import zarr

    data = np.random.default_rng(1).integers(0, 255, (10, 8, 6), dtype=np.uint8)  # stored as (x, y, z)
    arr = zarr.create_array(str(tmp_path / "xyz.zarr"), shape=data.shape, chunks=(5, 4, 3), dtype="uint8")
    arr[...] = data
    arr.attrs.update({"axes": ["x", "y", "z"], "resolution_nm": [4, 5, 6]})
    vol = open_volume(str(tmp_path / "xyz.zarr"))
    assert vol.meta.shape == (6, 8, 10) and vol.meta.voxel_size_nm == (6.0, 5.0, 4.0)
    assert (vol.read(vol.meta.roi)[0] == data.transpose(2, 1, 0)).all()


def test_ome_zarr_scale_level(tmp_path) -> None:
    url = f"zarr://file://{tmp_path}/ome.zarr/img"
    m = meta(1)
    create_volume(url, m)
    import zarr

    group = zarr.open_group(str(tmp_path / "ome.zarr/img"), mode="r+")
    group.create_array("s1", shape=(1, 6, 10, 14), chunks=(1, 4, 8, 8), dtype="uint8")
    attrs = dict(group.attrs)
    datasets = attrs["ome"]["multiscales"][0]["datasets"]
    datasets.append({"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [1, 60, 16, 16]}]})
    group.attrs.update(attrs)
    level = open_volume(url, scale=1)
    assert level.meta.shape == (6, 10, 14) and level.meta.voxel_size_nm == (60.0, 16.0, 16.0)
    with pytest.raises(StorageError, match="scale levels 0..1"):
        open_volume(url, scale=5)


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        ("missing", StorageError, "no zarr array"),
        ("two_d", StorageError, "3D volume"),
        ("group", StorageError, "without OME-Zarr multiscales"),
        ("no_info", StorageError, "cannot open precomputed"),
    ],
)
def test_bad_volumes(tmp_path, make: str, error: type, pattern: str) -> None:
    import zarr

    path = tmp_path / "bad.zarr"
    url = str(path)
    if make == "two_d":
        zarr.create_array(url, shape=(10, 10), dtype="uint8")
    elif make == "group":
        zarr.open_group(url, mode="w").create_array("raw", shape=(4, 4, 4), dtype="uint8")
    elif make == "no_info":
        path.mkdir()
        url = f"precomputed://file://{path}"
    with pytest.raises(error, match=pattern):
        open_volume(url)


def test_unreadable_chunk_names_the_region(tmp_path) -> None:
    url = f"zarr2://file://{tmp_path}/c.zarr/raw"
    m = meta(1)
    create_volume(url, m).write(m.roi, np.ones((1, *m.shape), np.uint8))
    (tmp_path / "c.zarr/raw/s0/0.0.0.0").write_bytes(b"not a compressed chunk")
    with pytest.raises(StorageError, match=r"chunk 0,0,0:4,8,8"):
        open_volume(url).read(m.roi)


def test_unwritable_output(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot create"):
        create_volume(f"zarr://file://{blocker}/out.zarr/p", meta())
