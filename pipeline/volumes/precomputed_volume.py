"""Neuroglancer precomputed volumes through cloud-volume (local files, gs://, s3://, https://)."""

from __future__ import annotations

from typing import Any

import numpy as np
from daisy import Roi

from pipeline.errors import StorageError
from pipeline.volumes.base import Volume, VolumeMeta
from pipeline.volumes.url import VolumeURL

PROVENANCE_METHOD = "mitoseg"


def _cloudvolume(location: str, mip: int, **kwargs: Any) -> Any:
    from cloudvolume import CloudVolume

    # fill_missing: chunks never written read as zeros, as in zarr.
    # parallel=1: cloud-volume 12.15 with parallel>1 was seen to write chunks into the wrong place
    # (see the notes on peers); parallelism comes from the Dask workers instead.
    return CloudVolume(
        location, mip=mip, bounded=True, fill_missing=True, progress=False, parallel=1, cache=False, **kwargs
    )


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
        return cls(url, cv, cls._meta(cv))

    @staticmethod
    def _meta(cv: Any) -> VolumeMeta:
        scale = cv.scale
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
        )

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
        self.cv[self._slices(roi)] = np.asarray(data).transpose(3, 2, 1, 0)

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
