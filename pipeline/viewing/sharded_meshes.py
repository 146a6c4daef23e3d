"""Sharded multi-resolution meshes (Neuroglancer's `neuroglancer_multilod_draco` with a `sharding` spec).

Each mesh block writes one scratch file (`fragments/<block id>.npz`) holding the unsimplified marching-cubes
pieces of all its objects. The client lists, per shard, the objects it holds and the blocks that hold them; one
merge task per shard then welds each object's pieces, simplifies it into levels of detail, cuts each level into
octree fragments, Draco-encodes them and writes the shard file (fragments, then the object's manifest). A viewer
finds any object through a few range requests into one shard file: its index, a minishard index, the manifest.

The algorithm is igneous' `MultiResShardedMeshMergeTask` (its per-object octree code is adapted here): igneous
itself is not a dependency because it pins DracoPy below 2 (cloud-volume uses 2.x here) and brings opencv,
kimimaro and pytest as run-time dependencies; its sharding spec, manifest and shard writer come from cloud-volume.
Objects get identity-hashed shards: consecutive IDs (as mitoseg's instances number them, block by block) share a
shard, so a merge task reads the fragment files of a few neighbouring blocks, not of every block.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from daisy import Block

MESH_TYPE = "neuroglancer_multilod_draco"
FRAGMENTS = "fragments"
"""Scratch folder inside the mesh folder: one file per mesh block, and one list per shard; removed after the merge."""
VERTEX_QUANTIZATION_BITS = 16
LABELS_PER_MINISHARD = 256
"""Objects per minishard: its index, fetched (gzip) before an object's manifest, stays about 6 kB."""
LABELS_PER_SHARD = 8192
"""Objects per shard file, and so per merge task."""


def sharding_spec(
    num_labels: int, labels_per_shard: int = LABELS_PER_SHARD, labels_per_minishard: int = LABELS_PER_MINISHARD
) -> dict[str, Any]:
    """Neuroglancer sharding of `num_labels` objects with IDs about 1..num_labels (identity hash): IDs below
    2**(preshift + minishard + shard bits) fill the shards in order, `labels_per_shard` each; larger IDs wrap."""
    bits = max(1, math.ceil(math.log2(num_labels + 1)))
    preshift = min(bits, max(0, round(math.log2(min(labels_per_minishard, labels_per_shard)))))
    minishard = min(bits - preshift, max(0, round(math.log2(labels_per_shard / labels_per_minishard))))
    return {
        "@type": "neuroglancer_uint64_sharded_v1",
        "preshift_bits": preshift,
        "hash": "identity",
        "minishard_bits": minishard,
        "shard_bits": bits - preshift - minishard,
        "minishard_index_encoding": "gzip",
        "data_encoding": "raw",
    }


def mesh_info(voxel_size_nm: tuple[float, float, float], sharding: dict[str, Any]) -> dict[str, Any]:
    """The mesh folder's `info`: fragments are stored in voxels (x, y, z) and scaled to nm by `transform`."""
    z, y, x = voxel_size_nm
    return {
        "@type": MESH_TYPE,
        "vertex_quantization_bits": VERTEX_QUANTIZATION_BITS,
        "transform": [x, 0, 0, 0, 0, y, 0, 0, 0, 0, z, 0],
        "lod_scale_multiplier": 1.0,
        "sharding": sharding,
    }


def shard_name(sharding: dict[str, Any], label: int) -> str:
    """File name of the shard that holds object `label`."""
    from cloudvolume.datasource.precomputed.sharding import ShardingSpecification

    return f"{ShardingSpecification.from_dict(sharding).compute_shard_location(label).shard_number}.shard"


def encode_block_fragments(meshes: dict[int, Any]) -> bytes:
    """One block's mesh pieces ({object id: zmesh.Mesh}, vertices in nm, x y z) as one npz file."""
    labels = sorted(meshes)
    parts = [meshes[i] for i in labels]
    buffer = io.BytesIO()
    np.savez(
        buffer,
        labels=np.array(labels, dtype=np.uint64),
        vertex_counts=np.array([len(m.vertices) for m in parts], dtype=np.int64),
        face_counts=np.array([len(m.faces) for m in parts], dtype=np.int64),
        vertices=np.concatenate([m.vertices for m in parts]).astype(np.float32),
        faces=np.concatenate([m.faces for m in parts]).astype(np.uint32),
    )
    return buffer.getvalue()


def decode_block_fragments(data: bytes, wanted: set[int]) -> dict[int, Any]:
    """The pieces of the `wanted` objects in one block's fragment file, as zmesh meshes."""
    import zmesh

    stored = np.load(io.BytesIO(data))
    vertex_ends, face_ends = np.cumsum(stored["vertex_counts"]), np.cumsum(stored["face_counts"])
    vertices, faces = stored["vertices"], stored["faces"]
    found = {}
    for row, label in enumerate(stored["labels"].tolist()):
        if label in wanted:
            v0, f0 = vertex_ends[row - 1] if row else 0, face_ends[row - 1] if row else 0
            found[label] = zmesh.Mesh(vertices[v0 : vertex_ends[row]], faces[f0 : face_ends[row]], None)
    return found


def weld(parts: list[Any], voxel_size_xyz: np.ndarray) -> Any:
    """One object's pieces joined in voxel units, shared vertices merged, in a canonical order (the same mesh
    whatever the blocks were)."""
    import zmesh

    mesh = zmesh.Mesh.concatenate(*parts)
    mesh.vertices = np.round(mesh.vertices / voxel_size_xyz * 256) / 256  # marching cubes: on half voxels
    mesh = mesh.consolidate()
    faces = mesh.faces
    first = np.argmin(faces, axis=1)[:, None]
    faces = np.take_along_axis(faces, (first + np.arange(3)) % 3, axis=1)  # same orientation, lowest index first
    return zmesh.Mesh(mesh.vertices.astype(np.float32), np.unique(faces, axis=0).astype(np.uint32), None)


def _zorder(position: tuple[int, ...]) -> int:
    """Morton code of an octree position (x, y, z): Neuroglancer wants each level's fragments in this order."""
    code = 0
    for bit in range(21):
        for axis, value in enumerate(position):
            code |= ((value >> bit) & 1) << (3 * bit + axis)
    return code


def _levels(mesh: Any, reduction_factor: int, num_lods: int) -> list[Any]:
    """Level 0 simplified `reduction_factor` times (0 or 1: as it is), each further level about 4 times coarser."""
    import zmesh

    levels = [mesh]
    if reduction_factor > 1:
        levels[0] = zmesh.simplify_fqmr(mesh, target_count=max(4, len(mesh.faces) // reduction_factor))
    for _ in range(1, num_lods):
        levels.append(zmesh.simplify_fqmr(levels[-1], target_count=max(4, len(levels[-1].faces) // 4)))
    return levels


def multires_mesh(
    label: int, mesh: Any, *, reduction_factor: int, max_lods: int, min_chunk_voxels: int, compression_level: int
) -> tuple[bytes, bytes] | None:
    """One object's levels of detail: its Draco octree fragments and its manifest (a shard stores them in this
    order, and indexes the manifest); `mesh` is welded, in voxels. An object larger than `min_chunk_voxels` * 2**k
    on every axis gets k + 1 levels, at most `max_lods`."""
    import DracoPy
    import zmesh
    from cloudvolume.datasource.precomputed.mesh.multilod import (
        MultiLevelPrecomputedMeshManifest,
        to_stored_model_space,
    )

    extent = mesh.vertices.max(axis=0) - np.floor(mesh.vertices.min(axis=0))
    num_lods = 1 + min(max_lods - 1, max(0, int(np.floor(np.log2(extent.min() / min_chunk_voxels)))))
    levels = [m for m in _levels(mesh, reduction_factor, num_lods) if len(m.faces)]
    if not levels:
        return None
    origin = np.floor(np.min([m.vertices.min(axis=0) for m in levels], axis=0))
    shape = np.ceil(np.max([m.vertices.max(axis=0) for m in levels], axis=0)) - origin
    chunk = np.ceil(shape / 2 ** (len(levels) - 1))
    pieces: list[dict[tuple[int, ...], Any]] = []
    for lod, level in enumerate(levels):
        if lod > 0:  # no triangle may cross a child node's border: Neuroglancer splits a node among its children
            finer = zmesh.chunk_mesh(level, chunk * 2 ** (lod - 1), origin)
            level = zmesh.Mesh.concatenate(*finer.values()).merge_close_vertices(radius=1e-5)
        cut: dict[tuple[int, ...], Any] = {(0, 0, 0): level}
        if lod < len(levels) - 1:
            cut = dict(zmesh.chunk_mesh(level, chunk * 2**lod, origin))
        if pieces:  # a node whose children have fragments needs one too, if empty
            cut = {tuple(p // 2 for p in child): None for child in pieces[-1]} | cut
        pieces.append(dict(sorted(cut.items(), key=lambda item: _zorder(item[0]))))
    manifest = MultiLevelPrecomputedMeshManifest(
        segment_id=label,
        chunk_shape=chunk,
        grid_origin=origin,
        num_lods=len(levels),
        lod_scales=[2**lod for lod in range(len(levels))],
        vertex_offsets=[[0, 0, 0]] * len(levels),
        num_fragments_per_lod=[len(p) for p in pieces],
        fragment_positions=[list(p) for p in pieces],
        fragment_offsets=[],
    )
    quantized = 2**VERTEX_QUANTIZATION_BITS - 1
    data = []
    for lod, nodes in enumerate(pieces):
        for index, piece in enumerate(nodes.values()):
            encoded = b""
            if piece is not None and len(piece.faces):
                stored = to_stored_model_space(piece.vertices, manifest, lod, VERTEX_QUANTIZATION_BITS, index)
                # origin 0 and range 2**bits - 1: the quantized integers are the stored positions themselves
                encoded = DracoPy.encode(
                    stored,
                    piece.faces,
                    quantization_bits=VERTEX_QUANTIZATION_BITS,
                    compression_level=compression_level,
                    quantization_range=quantized,
                    quantization_origin=[0, 0, 0],
                )
            manifest.fragment_offsets.append(len(encoded))
            data.append(encoded)
    return b"".join(data), manifest.to_binary()


def shard_list(labels: list[int], fragments: dict[int, list[int]]) -> bytes:
    """A shard's objects and, per object, the mesh blocks that hold its pieces (npz, for its merge task)."""
    blocks = [fragments[i] for i in labels]
    buffer = io.BytesIO()
    np.savez(
        buffer,
        labels=np.array(labels, dtype=np.uint64),
        offsets=np.cumsum([0] + [len(b) for b in blocks]).astype(np.int64),
        blocks=np.array([b for bs in blocks for b in bs], dtype=np.int64),
    )
    return buffer.getvalue()


@dataclass(frozen=True)
class MergeShard:
    """Per-shard task (block id k = the k-th shard listed): weld, simplify and encode its objects, write the shard."""

    mesh_dir: str
    sharding: dict[str, Any]
    voxel_size_nm: tuple[float, float, float]
    reduction_factor: int = 10
    max_lods: int = 3
    min_chunk_voxels: int = 16
    compression_level: int = 7

    def __call__(self, block: Block) -> str:
        """Return the name of the shard file written."""
        from cloudfiles import CloudFiles
        from cloudvolume.datasource.precomputed.sharding import ShardingSpecification, synthesize_shard_file

        files = CloudFiles(self.mesh_dir)
        listed = np.load(io.BytesIO(files.get(f"{FRAGMENTS}/shard-{block.block_id[1]}.npz")))
        labels, offsets, blocks = listed["labels"].tolist(), listed["offsets"], listed["blocks"]
        holders: dict[int, set[int]] = {}
        for row, label in enumerate(labels):
            for b in blocks[offsets[row] : offsets[row + 1]].tolist():
                holders.setdefault(b, set()).add(label)
        parts: dict[int, list[Any]] = {label: [] for label in labels}
        for b in sorted(holders):
            for label, piece in decode_block_fragments(files.get(f"{FRAGMENTS}/{b}.npz"), holders[b]).items():
                parts[label].append(piece)
        size_xyz = np.array(self.voxel_size_nm[::-1], dtype=np.float64)
        encoded: dict[int, bytes] = {}
        manifests: dict[int, int] = {}
        for label in labels:
            multires = multires_mesh(
                label,
                weld(parts.pop(label), size_xyz),
                reduction_factor=self.reduction_factor,
                max_lods=self.max_lods,
                min_chunk_voxels=self.min_chunk_voxels,
                compression_level=self.compression_level,
            )
            if multires is not None:
                encoded[label], manifests[label] = multires[0] + multires[1], len(multires[1])
        name = shard_name(self.sharding, labels[0])
        spec = ShardingSpecification.from_dict(self.sharding)
        files.put(name, synthesize_shard_file(spec, encoded, manifests), compress=None, cache_control="no-cache")
        return name
