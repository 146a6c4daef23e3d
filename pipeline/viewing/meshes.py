"""Meshes and segment properties of a segmentation volume, so each object can be listed and seen in 3D.

Each block meshes its objects with zmesh (marching cubes plus simplification) and writes one fragment
per object in Neuroglancer's legacy precomputed mesh format; blocks read one extra voxel on their high
faces, so neighbouring fragments meet without gaps, and meshes close only at the volume border. The
client then writes one manifest per object (`<id>:0`, listing its fragments) and the segment properties
(`size` in voxels, `volume_um3`). A precomputed layer gets them in its own folder (`mesh`,
`segment_properties`, named in its `info`); a zarr volume gets a precomputed companion folder `meshes`
inside its group, which the Neuroglancer state adds as a second source of the layer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from daisy import Block, Roi

from pipeline.errors import ConfigError
from pipeline.execution import RunResult, run_blockwise
from pipeline.geometry import Vec3, whole_chunks
from pipeline.plan import plan_blocks
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
    """Per-block task: mesh every object of the block and write one fragment per object."""

    url: str
    mesh_dir: str
    reduction_factor: int = 10
    max_error_nm: float | None = None

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
        written: set[int] = set()
        for label in mesher.ids():
            mesh = mesher.get(
                label,
                normals=False,
                reduction_factor=self.reduction_factor,
                max_error=self.max_error_nm,
                voxel_centered=True,
            )
            mesher.erase(label)
            if len(mesh.faces):
                mesh.vertices += origin_nm.astype(np.float32)
                files.put(
                    f"{label}:0:{block.block_id[1]}", mesh.to_precomputed(), compress=None, cache_control="no-cache"
                )
                written.add(int(label))
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
    block_shape: Vec3 | None = None,
    reduction_factor: int = 10,
    max_error_nm: float | None = None,
    max_in_flight: int | None = None,
    progress: bool = True,
) -> MeshResult:
    """Mesh every object of the segmentation at `url` and write its segment properties, on Dask.

    `block_shape` (z, y, x voxels, whole chunks; about 128 x 256 x 256 by default) sets the fragment size;
    `reduction_factor` and `max_error_nm` control zmesh's simplification. Earlier meshes are replaced.
    """
    from cloudfiles import CloudFiles

    volume = open_volume(url)
    meta = volume.meta
    if meta.layer_type != "segmentation" or not np.issubdtype(meta.dtype, np.integer) or meta.num_channels != 1:
        raise ConfigError(
            f"{url} is a {meta.layer_type} volume of {meta.num_channels} {meta.dtype} channel(s); meshes need a "
            "one-channel integer segmentation (layer_type 'segmentation')"
        )
    mesh_dir, properties_dir = mesh_location(volume)
    result = MeshResult(mesh_dir)
    files = CloudFiles(mesh_dir)
    files.delete(list(files.list()))
    mesh_info: dict[str, Any] = {"@type": "neuroglancer_legacy_mesh"}
    if volume.url.kind == "zarr":
        mesh_info["segment_properties"] = "segment_properties"
    files.put_json("info", mesh_info)

    plan = plan_blocks(meta.shape, meta.chunks, block_shape or whole_chunks(DEFAULT_BLOCK_VOXELS, meta.chunks))
    parsed = str(parse_volume_url(url))
    task = MeshBlock(parsed, mesh_dir, reduction_factor, max_error_nm)
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
    fragments: dict[int, list[str]] = {}
    for block_id, objects in sorted(run.results.items()):
        for label, (count, meshed) in objects.items():
            result.sizes[label] = result.sizes.get(label, 0) + count
            if meshed:
                fragments.setdefault(label, []).append(f"{label}:0:{block_id}")
    files.puts(
        ((f"{label}:0", json.dumps({"fragments": names}).encode()) for label, names in fragments.items()),
        compress=None,
    )
    CloudFiles(properties_dir).put_json("info", segment_properties(result.sizes, meta.voxel_size_nm))
    result.objects = len(fragments)
    if isinstance(volume, PrecomputedVolume):
        info = dict(volume.cv.info)
        info.update(mesh="mesh", segment_properties="segment_properties")
        volume.cv.info = info
        volume.cv.commit_info()
    log.info("meshes of %d object(s) written to %s", result.objects, mesh_dir)
    return result
