"""Neuroglancer precomputed volumes through cloud-volume (local files, gs://, s3://, https://)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from daisy import Roi

from pipeline.errors import GeometryError, StorageError
from pipeline.geometry import Vec3, cell_ranges, chunk_rois, grid_shape, morton_box
from pipeline.storage import configure
from pipeline.volumes.base import Volume, VolumeMeta
from pipeline.volumes.url import VolumeURL

PROVENANCE_METHOD = "mitoseg"
SHARDING_TYPE = "neuroglancer_uint64_sharded_v1"
MINISHARD_CHUNK_BITS = 9
"""At most 2^9 chunks per minishard, so a minishard index stays about 12 KB (one small range request)."""


def _cloudvolume(location: str, mip: int, **kwargs: Any) -> Any:
    from cloudvolume import CloudVolume

    # cloud-files reaches S3 through boto3, which reads the endpoint from the environment (pipeline.storage).
    configure()

    # fill_missing: chunks never written read as zeros, as in zarr.
    # parallel=1: cloud-volume 12.15 with parallel>1 was seen to write chunks into the wrong place
    # (see the notes on peers); parallelism comes from the Dask workers instead.
    return CloudVolume(
        location, mip=mip, bounded=True, fill_missing=True, progress=False, parallel=1, cache=False, **kwargs
    )


def sharding_spec(meta: VolumeMeta) -> dict[str, Any]:
    """A precomputed `sharding` spec whose shards are exactly the aligned boxes `meta.shards` (z, y, x voxels).

    Shards of the identity hash are boxes of 2^n chunks in Morton order (`morton_box`), so only some shapes are
    possible; an impossible one is refused with the nearest possible.
    """
    if meta.shards is None:
        raise GeometryError("a sharding spec needs a shard shape (shard_size)")
    chunks, shards = meta.chunks, meta.shards
    grid = grid_shape(meta.shape, chunks)
    ratio = [max(1, s // c) for s, c in zip(shards, chunks, strict=True)]
    bits = sum(math.ceil(math.log2(r)) for r in ratio)
    box = morton_box(grid, bits)
    same = all(min(b, g) == min(r, g) for b, r, g in zip(box, ratio, grid, strict=True))  # a whole axis is one shard
    if any(s % c for s, c in zip(shards, chunks, strict=True)) or not same:
        possible = tuple(b * c for b, c in zip(box, chunks, strict=True))
        raise GeometryError(
            f"precomputed shards of {shards} voxels (z,y,x) are not possible with chunks {chunks}: a shard is a box "
            f"of 2^n chunks filled in Morton order (x, then y, then z), e.g. {possible}; use such a shard_size, "
            "or a zarr3:// output, whose shards may be any multiple of the chunk"
        )
    total = sum(math.ceil(math.log2(g)) for g in grid)
    preshift = min(bits, MINISHARD_CHUNK_BITS)
    return {
        "@type": SHARDING_TYPE,
        "hash": "identity",
        "preshift_bits": preshift,
        "minishard_bits": bits - preshift,
        "shard_bits": max(0, total - bits),
        "minishard_index_encoding": "gzip",
        "data_encoding": "raw" if meta.layer_type == "segmentation" else "gzip",
    }


def shard_box(scale: dict[str, Any], location: str) -> Vec3 | None:
    """The (z, y, x voxel) box each shard of a precomputed scale holds, or None when it is unsharded.

    Refuses sharding whose shards are not boxes (a hashed layout, or too few shard bits, so boxes share a file):
    no block plan could give such a shard one writer.
    """
    spec = scale.get("sharding")
    if not spec:
        return None
    chunks = [int(c) for c in scale["chunk_sizes"][0]][::-1]
    grid = grid_shape([int(s) for s in scale["size"]][::-1], chunks)
    bits = int(spec.get("preshift_bits", 0)) + int(spec.get("minishard_bits", 0))
    total = sum(math.ceil(math.log2(g)) for g in grid)
    if spec.get("hash") != "identity" or int(spec.get("shard_bits", 0)) < total - bits:
        raise StorageError(
            f"precomputed layer {location} is sharded with hash {spec.get('hash')!r} and {spec.get('shard_bits')} "
            "shard bits: its shards are not boxes of chunks, so blocks cannot write them without losing data; "
            "write to a new output (mitoseg makes identity-hash shards) or to an unsharded one"
        )
    box = morton_box(grid, bits)  # clipped: a box past the volume's end on an axis is that whole axis
    return tuple(min(b, g) * c for b, g, c in zip(box, grid, chunks, strict=True))  # type: ignore[return-value]


class PrecomputedVolume(Volume):
    """A precomputed layer at one scale; channels are the layer's `num_channels`."""

    def __init__(self, url: VolumeURL, cv: Any, meta: VolumeMeta):
        super().__init__(url, meta)
        self.cv = cv
        self._origin = np.array(meta.voxel_offset)

    @classmethod
    def open(cls, url: VolumeURL, mode: str = "r", scale: int = 0) -> PrecomputedVolume:
        try:
            cv = _cloudvolume(url.location, scale, non_aligned_writes=True)
        except Exception as err:
            raise StorageError(
                f"cannot open precomputed layer {url}: {err}; check that the path exists and holds an 'info' file"
            ) from err
        volume = cls(url, cv, cls._meta(cv))
        if mode != "r":
            volume.refuse_unaligned_shards()
        return volume

    @staticmethod
    def _meta(cv: Any) -> VolumeMeta:
        scale = cv.scale
        try:
            shards = shard_box(scale, cv.cloudpath)
        except StorageError:
            shards = None  # still readable; `refuse_unaligned_shards` refuses to write it
        size = [int(s) for s in scale["size"]]
        chunks = [int(c) for c in scale["chunk_sizes"][0]]
        res = [float(r) for r in scale["resolution"]]
        offset = [int(o) for o in scale.get("voxel_offset", [0, 0, 0])]
        return VolumeMeta(
            shape=tuple(size[::-1]),  # type: ignore[arg-type]
            dtype=np.dtype(cv.info["data_type"]),
            chunks=tuple(chunks[::-1]),  # type: ignore[arg-type]
            num_channels=int(cv.info.get("num_channels", 1)),
            voxel_size_nm=tuple(res[::-1]),  # type: ignore[arg-type]
            voxel_offset=tuple(offset[::-1]),  # type: ignore[arg-type]
            layer_type=cv.info.get("type", "image"),
            shards=shards,
        )

    @classmethod
    def check_layout(cls, url: VolumeURL, meta: VolumeMeta) -> None:
        """Shards must be boxes that the identity hash can make (`sharding_spec`)."""
        if meta.shards is not None:
            sharding_spec(meta)

    @classmethod
    def create(cls, url: VolumeURL, meta: VolumeMeta, attributes: dict[str, Any] | None = None) -> PrecomputedVolume:
        """Write a new `info` for a single-scale layer (pyramids are added by the viewing stage)."""
        from cloudvolume import CloudVolume

        segmentation = meta.layer_type == "segmentation"
        info = CloudVolume.create_new_info(
            num_channels=meta.num_channels,
            layer_type=meta.layer_type,
            data_type=np.dtype(meta.dtype).name,
            encoding="compressed_segmentation" if segmentation else "raw",
            resolution=list(meta.voxel_size_nm[::-1]),
            voxel_offset=list(meta.voxel_offset[::-1]),
            volume_size=list(meta.shape[::-1]),
            chunk_size=list(meta.chunks[::-1]),
            compressed_segmentation_block_size=[8, 8, 8] if segmentation else None,
        )
        if meta.shards is not None:
            info["scales"][0]["sharding"] = sharding_spec(meta)
        try:
            cv = _cloudvolume(url.location, 0, info=info, non_aligned_writes=True)
            cv.commit_info()
            cv.provenance.description = "written by mitoseg"
            cv.commit_provenance()
        except Exception as err:
            raise StorageError(f"cannot create precomputed layer {url}: {err}; check that it is writable") from err
        return cls(url, cv, cls._meta(cv))

    def _slices(self, roi: Roi) -> tuple[slice, slice, slice]:
        begin = np.array(roi.begin) + self._origin
        end = np.array(roi.end) + self._origin
        return (slice(begin[2], end[2]), slice(begin[1], end[1]), slice(begin[0], end[0]))

    def _read(self, roi: Roi) -> np.ndarray:
        data = np.asarray(self.cv[self._slices(roi)])  # (x, y, z, c)
        return np.ascontiguousarray(data.transpose(3, 2, 1, 0))

    def _write(self, roi: Roi, data: np.ndarray) -> None:
        if self.meta.shards is None:
            self.cv[self._slices(roi)] = np.asarray(data).transpose(3, 2, 1, 0)
            return
        # cloud-volume writes one whole shard file per upload: write shard by shard, and complete a shard
        # that `roi` covers only in part (a region-of-interest border) with what it holds already.
        for index in itertools.product(*cell_ranges(roi, self.meta.shards)):
            shard = Roi([i * s for i, s in zip(index, self.meta.shards, strict=True)], self.meta.shards)
            shard = shard.intersect(self.meta.roi)
            part = shard.intersect(roi)
            inside = (
                slice(None),
                *(slice(b - o, e - o) for b, e, o in zip(part.begin, part.end, roi.begin, strict=True)),
            )
            if part == shard:
                whole = data[inside]
            else:
                whole = self._read(shard)
                at = (
                    slice(None),
                    *(slice(b - o, e - o) for b, e, o in zip(part.begin, part.end, shard.begin, strict=True)),
                )
                whole[at] = data[inside]
            self.cv[self._slices(shard)] = np.asarray(whole).transpose(3, 2, 1, 0)

    def missing_chunks(self, roi: Roi) -> list[Roi]:
        """The chunks of `roi` absent from storage (cloud-volume's `fill_missing` reads them as zeros)."""
        cells = list(chunk_rois(roi, self.meta.chunks, within=self.meta.roi))
        if self.cv.image.is_sharded(self.cv.mip):
            from cloudvolume.datasource.precomputed.common import compressed_morton_code

            grid = np.array(grid_shape(self.meta.shape, self.meta.chunks)[::-1], np.uint32)
            points = [[b // c for b, c in zip(cell.begin, self.meta.chunks, strict=True)][::-1] for cell in cells]
            codes = [int(code) for code in compressed_morton_code(points, grid)]
            found = self.cv.image.shard_reader().exists(codes, self.cv.key)
            present = [found[code] is not None for code in codes]
        else:
            stored = self.cv.exists(self._slices(roi))
            present = [stored.get(self._chunk_name(cell), False) for cell in cells]
        return [cell for cell, here in zip(cells, present, strict=True) if not here]

    def _chunk_name(self, cell: Roi) -> str:
        """The file of a chunk (z, y, x voxels from the array start) in its scale's folder: key/x0-x1_y0-y1_z0-z1."""
        lo, hi = np.array(cell.begin) + self._origin, np.array(cell.end) + self._origin
        return f"{self.cv.key}/" + "_".join(f"{lo[i]}-{hi[i]}" for i in (2, 1, 0))

    def refuse_unaligned_shards(self) -> None:
        """Refuse to write into a layer whose sharding no block plan can give one writer per shard."""
        shard_box(self.cv.scale, str(self.url))

    @property
    def provenance(self) -> dict[str, Any]:
        for step in reversed(self.cv.provenance.processing):
            method = step.get("method") if isinstance(step, dict) else None
            if isinstance(method, dict) and PROVENANCE_METHOD in method:
                return dict(method[PROVENANCE_METHOD])
        return {}

    def set_provenance(self, record: dict[str, Any]) -> None:
        self.cv.provenance.processing.append({"method": {PROVENANCE_METHOD: record}})
        self.cv.commit_provenance()
