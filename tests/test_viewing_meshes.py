"""Meshes and segment properties: blockwise fragments that close into watertight surfaces, sizes that match."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.viewing.meshes import add_meshes, segment_properties
from pipeline.volumes import VolumeMeta, create_volume

SHAPE, CHUNKS, VOXEL_NM, OFFSET = (24, 40, 36), (8, 8, 8), (8.0, 4.0, 4.0), (1, 2, 3)


def _labels() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint64)
    labels[3:20, 5:30, 4:25] = 7  # crosses many block faces and corners
    labels[0:6, 0:8, 30:36] = 2**40 + 1  # touches the volume border: closed there
    labels[12, 35, 10] = 3  # one voxel
    labels[16:24, 32:40, 16:24] = 11  # starts on block faces next to blocks that hold nothing
    return labels


def _write(tmp_path: Path, scheme: str) -> tuple[str, Path]:
    meta = VolumeMeta(
        shape=SHAPE,
        dtype=np.dtype(np.uint64),
        chunks=CHUNKS,
        voxel_size_nm=VOXEL_NM,
        voxel_offset=OFFSET,
        layer_type="segmentation",
    )
    if scheme == "zarr":
        url, mesh_dir = f"zarr://file://{tmp_path}/out.zarr/instances", tmp_path / "out.zarr" / "instances" / "meshes"
    else:
        url, mesh_dir = f"precomputed://file://{tmp_path}/instances", tmp_path / "instances" / "mesh"
    create_volume(url, meta).write(meta.roi, _labels()[None])
    return url, mesh_dir


def _load(mesh_dir: Path, label: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Vertices and faces of all fragments of `label` joined, and the number of fragments."""
    import zmesh

    names = json.loads((mesh_dir / f"{label}:0").read_text())["fragments"]
    meshes = [zmesh.Mesh.from_precomputed((mesh_dir / n).read_bytes()) for n in names]
    vertices, faces, base = [], [], 0
    for m in meshes:
        vertices.append(m.vertices)
        faces.append(m.faces + base)
        base += len(m.vertices)
    return np.concatenate(vertices), np.concatenate(faces), len(names)


def _open_edges(vertices: np.ndarray, faces: np.ndarray) -> int:
    """Edges not shared by exactly two triangles, after joining vertices at the same place."""
    _, index = np.unique(np.round(vertices, 3), axis=0, return_inverse=True)
    f = index.ravel()[faces]
    edges = Counter(tuple(sorted(e)) for tri in f for e in ((tri[0], tri[1]), (tri[1], tri[2]), (tri[2], tri[0])))
    return sum(1 for n in edges.values() if n != 2)


@pytest.mark.parametrize("scheme", ["precomputed", "zarr"])
def test_fragments_join_into_closed_meshes_and_sizes_match(client: Any, tmp_path: Path, scheme: str) -> None:
    url, mesh_dir = _write(tmp_path, scheme)

    result = add_meshes(client, url, block_shape=(8, 16, 16), reduction_factor=0, progress=False)

    assert result.ok and result.objects == 4
    ids, counts = np.unique(_labels(), return_counts=True)
    assert result.sizes == {int(i): int(n) for i, n in zip(ids, counts, strict=True) if i}
    vertices, faces, fragments = _load(mesh_dir, 7)
    assert fragments > 4
    assert _open_edges(vertices, faces) == 0
    lo = np.array([(b + o) * r for b, o, r in zip((3, 5, 4), OFFSET, VOXEL_NM, strict=True)])[::-1]
    hi = np.array([(e + o) * r for e, o, r in zip((20, 30, 25), OFFSET, VOXEL_NM, strict=True)])[::-1]
    np.testing.assert_allclose(vertices.min(axis=0), lo)
    np.testing.assert_allclose(vertices.max(axis=0), hi)
    for label in (2**40 + 1, 11):
        assert _open_edges(*_load(mesh_dir, label)[:2]) == 0, f"object {label} has holes"
    props_dir = mesh_dir.parent / "segment_properties" if scheme == "precomputed" else mesh_dir / "segment_properties"
    props = json.loads((props_dir / "info").read_text())
    assert props == segment_properties(result.sizes, VOXEL_NM)
    assert json.loads((mesh_dir / "info").read_text())["@type"] == "neuroglancer_legacy_mesh"
    if scheme == "precomputed":
        info = json.loads((tmp_path / "instances" / "info").read_text())
        assert (info["mesh"], info["segment_properties"]) == ("mesh", "segment_properties")


def test_simplified_meshes_keep_the_object_extent(client: Any, tmp_path: Path) -> None:
    url, mesh_dir = _write(tmp_path, "precomputed")
    add_meshes(client, url, block_shape=(16, 16, 16), progress=False)
    vertices, _, _ = _load(mesh_dir, 7)
    lo = np.array([(b + o) * r for b, o, r in zip((3, 5, 4), OFFSET, VOXEL_NM, strict=True)])[::-1]
    np.testing.assert_allclose(vertices.min(axis=0), lo, atol=max(VOXEL_NM))


def test_segment_properties_format() -> None:
    props = segment_properties({5: 10, 2: 3}, (10.0, 10.0, 10.0))
    assert props["inline"]["ids"] == ["2", "5"]
    size, volume = props["inline"]["properties"]
    assert size == {"id": "size", "type": "number", "description": "voxels", "data_type": "uint32", "values": [3, 10]}
    assert (volume["id"], volume["data_type"], volume["values"]) == ("volume_um3", "float32", [3e-6, 1e-5])


def test_image_volume_is_refused(client: Any, tmp_path: Path) -> None:
    meta = VolumeMeta(shape=(8, 8, 8), dtype=np.dtype(np.uint8), chunks=(8, 8, 8))
    create_volume(f"precomputed://file://{tmp_path}/raw", meta)
    with pytest.raises(ConfigError, match="one-channel integer segmentation"):
        add_meshes(client, f"precomputed://file://{tmp_path}/raw", progress=False)
