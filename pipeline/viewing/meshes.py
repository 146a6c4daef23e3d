"""Meshes and segment properties of a segmentation volume, so each object can be listed and seen in 3D.

Each block meshes its objects with zmesh (marching cubes); blocks read one extra voxel on their high faces,
so neighbouring pieces meet without gaps, and meshes close only at the volume border. Two formats:
`sharded` (`pipeline.viewing.sharded_meshes`: one fragment file per block, then one merge task per shard
writes multi-resolution meshes into a few shard files) and `legacy` (each block simplifies and writes one
file per object; the client writes one manifest per object, `<id>:0`, listing its fragments: fine for
thousands of objects, not millions). The client also writes the segment properties (`size` in voxels,
`volume_um3`). A precomputed layer gets them in its own folder (`mesh`,
`segment_properties`, named in its `info`); a zarr volume gets a precomputed companion folder `meshes`
inside its group, which the Neuroglancer state adds as a second source of the layer.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from daisy import Block, Roi

from pipeline.config.instances import MeshFormat
from pipeline.errors import ConfigError
from pipeline.execution import RunResult, run_blockwise
from pipeline.geometry import Vec3, whole_chunks
from pipeline.plan import plan_blocks
from pipeline.viewing import sharded_meshes
from pipeline.volumes import Volume, open_volume, parse_volume_url
from pipeline.volumes.precomputed_volume import PrecomputedVolume

log = logging.getLogger(__name__)

ZARR_COMPANION = "meshes"
"""Folder inside a zarr segmentation group that holds its precomputed meshes and segment properties."""
DEFAULT_BLOCK_VOXELS: Vec3 = (128, 256, 256)


@dataclass
class MeshResult:
    """Where the meshes went, how many objects got one, and the blockwise run."""

    location: str
    """Storage URL of the folder holding the mesh `info`, fragments and manifests."""
    objects: int = 0
    run: RunResult | None = None
    sizes: dict[int, int] = field(default_factory=dict)
    """Voxel count of every object."""
    shards: int = 0
    """Shard files written (sharded format); the merge's failures are listed in `run` as mesh blocks."""

    @property
    def ok(self) -> bool:
        return self.run is not None and self.run.ok


def mesh_location(volume: Volume) -> tuple[str, str]:
    """(folder of the mesh data, folder of the segment properties) of a segmentation volume."""
    if volume.url.kind == "precomputed":
        return f"{volume.url.location}/mesh", f"{volume.url.location}/segment_properties"
    companion = f"{volume.url.location}/{ZARR_COMPANION}"
    return companion, f"{companion}/segment_properties"


@dataclass(frozen=True)
class MeshBlock:
    """Per-block task: mesh every object of the block and write one fragment per object (legacy, simplified), or
    one file of every object's unsimplified piece (`sharded`: simplified after the merge)."""

    url: str
    mesh_dir: str
    reduction_factor: int = 10
    max_error_nm: float | None = None
    sharded: bool = False

    def __call__(self, block: Block) -> dict[int, tuple[int, bool]]:
        """Return {object id: (voxels inside the write region, whether a fragment was written)}."""
        import fastremap
        import zmesh
        from cloudfiles import CloudFiles

        volume = open_volume(self.url)
        meta = volume.meta
        write = block.write_roi
        read = Roi(write.begin, [s + 1 for s in write.shape]).intersect(meta.roi)
        labels = volume.read(read)[0]
        ids, counts = fastremap.unique(labels[tuple(slice(0, s) for s in write.shape)], return_counts=True)
        sizes = {int(i): int(n) for i, n in zip(ids, counts, strict=True) if i != 0}
        if not labels.any():  # an object only in the extra voxels still needs this block's faces
            return {}
        # zeros outside the volume border close the meshes there; inner faces stay open and meet their neighbour
        low = [1 if b == 0 else 0 for b in read.begin]
        high = [1 if e == s else 0 for e, s in zip(read.end, meta.shape, strict=True)]
        padded = np.pad(labels, list(zip(low, high, strict=True)))
        size_xyz = meta.voxel_size_nm[::-1]
        origin_nm = np.array(
            [(b - p + o) * r for b, p, o, r in zip(read.begin, low, meta.voxel_offset, meta.voxel_size_nm, strict=True)]
        )[::-1]
        mesher = zmesh.Mesher(size_xyz)
        mesher.mesh(np.asfortranarray(padded.transpose()), close=False)
        files = CloudFiles(self.mesh_dir)
        pieces: dict[int, Any] = {}
        for label in mesher.ids():
            mesh = mesher.get(
                label,
                normals=False,
                reduction_factor=0 if self.sharded else self.reduction_factor,
                max_error=None if self.sharded else self.max_error_nm,
                voxel_centered=True,
            )
            mesher.erase(label)
            if len(mesh.faces):
                mesh.vertices += origin_nm.astype(np.float32)
                pieces[int(label)] = mesh
        block_id = block.block_id[1]
        if self.sharded and pieces:
            data = sharded_meshes.encode_block_fragments(pieces)
            files.put(f"{sharded_meshes.FRAGMENTS}/{block_id}.npz", data, compress=None, cache_control="no-cache")
        elif pieces:
            files.puts(
                ((f"{label}:0:{block_id}", mesh.to_precomputed()) for label, mesh in pieces.items()),
                compress=None,
                cache_control="no-cache",
            )
        written = set(pieces)
        return {i: (n, i in written) for i, n in sizes.items()} | {i: (0, True) for i in written - sizes.keys()}


def segment_properties(
    sizes: dict[int, int], voxel_size_nm: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> dict[str, Any]:
    """Neuroglancer segment properties `info` listing every object with its size in voxels and in µm³."""
    ids = sorted(sizes)
    values = [sizes[i] for i in ids]
    voxel_um3 = float(np.prod(voxel_size_nm)) / 1e9
    return {
        "@type": "neuroglancer_segment_properties",
        "inline": {
            "ids": [str(i) for i in ids],
            "properties": [
                {
                    "id": "size",
                    "type": "number",
                    "description": "voxels",
                    "data_type": "uint32" if max(values, default=0) < 2**32 else "float32",
                    "values": values,
                },
                {
                    "id": "volume_um3",
                    "type": "number",
                    "description": "volume in cubic micrometres",
                    "data_type": "float32",
                    "values": [round(v * voxel_um3, 6) for v in values],
                },
            ],
        },
    }


def add_meshes(
    client: Any,
    url: str,
    *,
    mesh_format: MeshFormat = "sharded",
    block_shape: Vec3 | None = None,
    reduction_factor: int = 10,
    max_error_nm: float | None = None,
    max_lods: int = 3,
    min_chunk_voxels: int = 16,
    labels_per_shard: int = sharded_meshes.LABELS_PER_SHARD,
    max_in_flight: int | None = None,
    progress: bool = True,
) -> MeshResult:
    """Mesh every object of the segmentation at `url` and write its segment properties, on Dask.

    `block_shape` (z, y, x voxels, whole chunks; about 128 x 256 x 256 by default) sets the piece size;
    `reduction_factor` (and, legacy only, `max_error_nm`) control the simplification. Sharded meshes get up to
    `max_lods` levels of detail (an object gets one more for each doubling of its smallest extent beyond
    `min_chunk_voxels`) and `labels_per_shard` objects per shard file. Earlier meshes are replaced.
    """
    from cloudfiles import CloudFiles

    volume = open_volume(url)
    meta = volume.meta
    if meta.layer_type != "segmentation" or not np.issubdtype(meta.dtype, np.integer) or meta.num_channels != 1:
        raise ConfigError(
            f"{url} is a {meta.layer_type} volume of {meta.num_channels} {meta.dtype} channel(s); meshes need a "
            "one-channel integer segmentation (layer_type 'segmentation')"
        )
    sharded = mesh_format == "sharded"
    if sharded and max_error_nm is not None:
        raise ConfigError("max_error_nm applies to legacy meshes only; sharded ones use reduction_factor")
    mesh_dir, properties_dir = mesh_location(volume)
    result = MeshResult(mesh_dir)
    files = CloudFiles(mesh_dir)
    files.delete(list(files.list()))

    plan = plan_blocks(meta.shape, meta.chunks, block_shape or whole_chunks(DEFAULT_BLOCK_VOXELS, meta.chunks))
    parsed = str(parse_volume_url(url))
    task = MeshBlock(parsed, mesh_dir, reduction_factor, max_error_nm, sharded)
    run = run_blockwise(
        client,
        plan,
        task,
        max_in_flight=max_in_flight,
        description="meshes",
        progress=progress,
        keep_results=True,
    )
    result.run = run
    fragments: dict[int, list[int]] = {}
    for block_id, objects in sorted(run.results.items()):
        for label, (count, meshed) in objects.items():
            result.sizes[label] = result.sizes.get(label, 0) + count
            if meshed:
                fragments.setdefault(label, []).append(block_id)
    mesh_info: dict[str, Any] = {"@type": "neuroglancer_legacy_mesh"}
    if sharded:
        sharding = sharded_meshes.sharding_spec(len(fragments), labels_per_shard)
        mesh_info = sharded_meshes.mesh_info(meta.voxel_size_nm, sharding)
        if run.ok:  # else a re-run remeshes: every block's pieces are needed
            merge = sharded_meshes.MergeShard(
                mesh_dir, sharding, meta.voxel_size_nm, reduction_factor, max_lods, min_chunk_voxels
            )
            result.shards = _write_shards(client, merge, fragments, run, max_in_flight, progress)
    else:
        files.puts(
            (
                (f"{label}:0", json.dumps({"fragments": [f"{label}:0:{b}" for b in blocks]}).encode())
                for label, blocks in fragments.items()
            ),
            compress=None,
        )
    if volume.url.kind == "zarr":
        mesh_info["segment_properties"] = "segment_properties"
    files.put_json("info", mesh_info)
    CloudFiles(properties_dir).put_json("info", segment_properties(result.sizes, meta.voxel_size_nm))
    result.objects = len(fragments)
    if isinstance(volume, PrecomputedVolume):
        info = dict(volume.cv.info)
        info.update(mesh="mesh", segment_properties="segment_properties")
        volume.cv.info = info
        volume.cv.commit_info()
    log.info("%s meshes of %d object(s) written to %s", mesh_format, result.objects, mesh_dir)
    return result


def _write_shards(
    client: Any,
    task: sharded_meshes.MergeShard,
    fragments: dict[int, list[int]],
    run: RunResult,
    max_in_flight: int | None,
    progress: bool,
) -> int:
    """The sharded format's second pass: list each shard's objects ({id: blocks holding its pieces}), then one
    blockwise task per shard; failed shards join `run`'s failures. Returns the number of shard files written; the
    scratch goes once all are."""
    from cloudfiles import CloudFiles

    by_shard: dict[str, list[int]] = {}
    for label in sorted(fragments):
        by_shard.setdefault(sharded_meshes.shard_name(task.sharding, label), []).append(label)
    names = sorted(by_shard)
    if not names:
        return 0
    lists = (
        (f"{sharded_meshes.FRAGMENTS}/shard-{k}.npz", sharded_meshes.shard_list(by_shard[n], fragments))
        for k, n in enumerate(names)
    )
    CloudFiles(task.mesh_dir).puts(lists, compress=None)
    plan = plan_blocks((1, 1, len(names)), (1, 1, 1), (1, 1, 1))  # block k: the k-th shard
    merged = run_blockwise(
        client, plan, task, max_in_flight=max_in_flight, description="mesh shards", progress=progress
    )
    run.failures += [replace(f, write_roi=f"shard {names[f.block_id]}") for f in merged.failures]
    if merged.ok:
        scratch = f"{task.mesh_dir}/{sharded_meshes.FRAGMENTS}"
        if scratch.startswith("file://"):
            shutil.rmtree(scratch[len("file://") :], ignore_errors=True)
        else:
            CloudFiles(scratch).delete(list(CloudFiles(scratch).list()))
    return merged.completed
