"""Meshes and segment properties: blockwise fragments that close into watertight surfaces, sizes that match;
sharded multi-resolution meshes that cloud-volume decodes, one file per shard, the same whatever the blocks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.viewing import sharded_meshes
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

    result = add_meshes(client, url, mesh_format="legacy", block_shape=(8, 16, 16), reduction_factor=0, progress=False)

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
    add_meshes(client, url, mesh_format="legacy", block_shape=(16, 16, 16), progress=False)
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


def _voxel_bounds_nm(label: int) -> tuple[np.ndarray, np.ndarray]:
    """Low and high corner (x, y, z nm) of the voxels of `label`."""
    found = np.argwhere(_labels() == label)
    lo = (found.min(axis=0) + OFFSET) * np.array(VOXEL_NM)
    hi = (found.max(axis=0) + 1 + OFFSET) * np.array(VOXEL_NM)
    return lo[::-1], hi[::-1]


def test_sharded_meshes_decode_to_every_object_in_one_file_per_shard(client: Any, tmp_path: Path) -> None:
    from cloudvolume import CloudVolume

    url, mesh_dir = _write(tmp_path, "precomputed")
    result = add_meshes(client, url, block_shape=(8, 16, 16), labels_per_shard=2, min_chunk_voxels=4, progress=False)

    assert result.ok and result.objects == 4
    shards = {sharded_meshes.shard_name(sharded_meshes.sharding_spec(4, 2), i) for i in result.sizes}
    assert result.shards == len(shards) == 3  # IDs 3 and 11 share one
    assert sorted(p.name for p in mesh_dir.iterdir()) == sorted([*shards, "info"])  # the scratch is gone
    info = json.loads((mesh_dir / "info").read_text())
    assert info["@type"] == "neuroglancer_multilod_draco" and info["sharding"]["@type"].endswith("sharded_v1")
    assert json.loads((tmp_path / "instances" / "info").read_text())["mesh"] == "mesh"
    cv = CloudVolume(f"file://{tmp_path}/instances", progress=False)
    for label in result.sizes:
        lo, hi = _voxel_bounds_nm(label)
        mesh = cv.mesh.get(label)[label]
        np.testing.assert_allclose(mesh.vertices.min(axis=0), lo, atol=max(VOXEL_NM))
        np.testing.assert_allclose(mesh.vertices.max(axis=0), hi, atol=max(VOXEL_NM))
        coarsest = cv.mesh.get(label, lod=-1)[label]
        assert 0 < len(coarsest.faces) <= len(mesh.faces)
    assert cv.mesh.get_manifest(7).num_lods == 3  # 17 x 25 x 21 voxels: 4, 8 and 16 voxel chunks


def test_sharded_meshes_are_the_same_whatever_the_blocks_and_close(client: Any, tmp_path: Path) -> None:
    from cloudvolume import CloudVolume

    shards = []
    for name, scheme, block in (
        ("a", "precomputed", (8, 16, 16)),
        ("b", "precomputed", (24, 40, 40)),
        ("c", "zarr", (16, 8, 24)),
    ):
        url, mesh_dir = _write(tmp_path / name, scheme)
        assert add_meshes(client, url, block_shape=block, reduction_factor=0, progress=False).ok
        shards.append({p.name: p.read_bytes() for p in mesh_dir.glob("*.shard")})
    assert shards[0] == shards[1] == shards[2] and len(shards[0]) == 1
    zarr_info = json.loads((tmp_path / "c" / "out.zarr" / "instances" / "meshes" / "info").read_text())
    assert zarr_info["segment_properties"] == "segment_properties"

    cv = CloudVolume(f"file://{tmp_path}/a/instances", progress=False)
    for label in (7, 11, 2**40 + 1):  # unsimplified level 0: the marching-cubes surface, closed across fragments
        mesh = cv.mesh.get(label)[label]
        assert _open_edges(mesh.vertices, mesh.faces) == 0, f"object {label} has holes"


def test_sharding_fills_shards_in_id_order() -> None:
    spec = sharded_meshes.sharding_spec(20_000)
    assert (spec["hash"], spec["preshift_bits"], spec["minishard_bits"], spec["shard_bits"]) == ("identity", 8, 5, 2)
    names = [sharded_meshes.shard_name(spec, i) for i in (1, 8191, 8192, 16383, 16384, 20_000)]
    assert names == ["0.shard", "0.shard", "1.shard", "1.shard", "2.shard", "2.shard"]
    assert sharded_meshes.sharding_spec(1)["shard_bits"] == 0


def test_a_failed_shard_is_listed_and_a_rerun_writes_it(
    client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, mesh_dir = _write(tmp_path, "precomputed")
    original = sharded_meshes.MergeShard.__call__

    def broken(self: Any, block: Any) -> Any:
        if block.block_id[1] == 0:
            raise OSError("injected: shard cannot be written")
        return original(self, block)

    with monkeypatch.context() as patch:
        patch.setattr(sharded_meshes.MergeShard, "__call__", broken)
        failed = add_meshes(client, url, block_shape=(8, 16, 16), labels_per_shard=2, progress=False)
    [failure] = failed.run.failures
    assert not failed.ok and failure.write_roi == "shard 0.shard" and "injected" in failure.error
    assert failed.shards == 2 and (mesh_dir / "fragments").is_dir()  # kept: the re-run starts afresh anyway

    repaired = add_meshes(client, url, block_shape=(8, 16, 16), labels_per_shard=2, progress=False)
    assert repaired.ok and repaired.shards == 3 and not (mesh_dir / "fragments").exists()


def test_max_error_is_refused_for_sharded_meshes(client: Any, tmp_path: Path) -> None:
    url, _ = _write(tmp_path, "precomputed")
    with pytest.raises(ConfigError, match="legacy meshes only"):
        add_meshes(client, url, max_error_nm=8.0, progress=False)
