"""The one interface every volume backend implements, and the metadata that travels with a volume."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from daisy import Roi

from pipeline.errors import BlockFailedError, GeometryError, StorageError
from pipeline.geometry import Vec3, check_ownership, chunk_rois, roi_key
from pipeline.volumes.url import VolumeURL

LayerType = Literal["image", "segmentation"]


@dataclass(frozen=True)
class VolumeMeta:
    """Shape and physical placement of a volume, always in (z, y, x) order.

    Coordinates inside mitoseg are voxels from the array start; `voxel_offset` (voxels) and
    `voxel_size_nm` only travel from input to output so that both line up in a viewer.
    """

    shape: Vec3
    dtype: np.dtype
    chunks: Vec3
    num_channels: int = 1
    voxel_size_nm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    voxel_offset: Vec3 = (0, 0, 0)
    layer_type: LayerType = "image"
    shards: Vec3 | None = None
    """Shard (z, y, x voxels, whole chunks) of a sharded volume, one file per shard; None: one file per chunk."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def roi(self) -> Roi:
        """The whole volume as a region in voxels from the array start."""
        return Roi((0, 0, 0), self.shape)

    @property
    def write_unit(self) -> Vec3:
        """What one writer must own whole: the shard of a sharded volume, else the chunk.

        Two writers of one shard lose data: each rewrites the whole shard file."""
        return self.shards or self.chunks

    def derive(self, **changes: Any) -> VolumeMeta:
        """A copy with some fields changed (e.g. the metadata of an output made from an input).

        Sharding is a layout choice of one stored volume: a derived volume is unsharded unless `shards` is given."""
        if "dtype" in changes:
            changes["dtype"] = np.dtype(changes["dtype"])
        return replace(self, **{"shards": None, **changes})


class Volume(ABC):
    """A 3D (optionally multi-channel) array in some storage, read and written by region."""

    def __init__(self, url: VolumeURL, meta: VolumeMeta):
        self.url = url
        self.meta = meta

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url}, shape={self.meta.shape}, dtype={self.meta.dtype})"

    @classmethod
    def check_layout(cls, url: VolumeURL, meta: VolumeMeta) -> None:
        """Refuse a layout (chunks, shards) that this backend cannot create at `url`, before anything is written."""
        if meta.shards is not None:
            check_ownership(meta.shards, meta.chunks, "output chunks", "shard shape")

    def check_roi(self, roi: Roi) -> None:
        """Refuse a region that is not inside the volume."""
        if not self.meta.roi.contains(roi) or any(s <= 0 for s in roi.shape):
            raise GeometryError(
                f"region {roi} is outside {self.url} (volume shape z,y,x = {self.meta.shape}); "
                "give a region inside the volume"
            )

    def read(self, roi: Roi) -> np.ndarray:
        """Voxels of `roi` as (channels, z, y, x)."""
        self.check_roi(roi)
        try:
            return self._read(roi)
        except StorageError:
            raise
        except Exception as err:  # backends raise many kinds; name the volume, region and chunk
            chunk = self._failing_chunk(roi)
            where = f" (chunk {chunk}, z,y,x voxels)" if chunk else ""
            raise StorageError(
                f"cannot read region {roi} of {self.url}{where}: {type(err).__name__}: {err}; "
                "the stored data may be damaged: rewrite that chunk or exclude it with a region of interest"
            ) from err

    def _failing_chunk(self, roi: Roi) -> str | None:
        """The first chunk of `roi` that cannot be read, as `offset:shape` (only on the error path)."""
        for cell in chunk_rois(roi, self.meta.chunks, within=self.meta.roi):
            try:
                self._read(cell)
            except Exception:
                return roi_key(cell)
        return None

    def missing_chunks(self, roi: Roi) -> list[Roi]:
        """The stored chunks (or shards) of `roi` absent from storage, which read as the fill value; backends that
        can tell override this."""
        return []

    def write(self, roi: Roi, data: np.ndarray) -> None:
        """Store (channels, z, y, x) `data` at `roi`."""
        self.check_roi(roi)
        expected = (self.meta.num_channels, *roi.shape)
        if data.shape != expected:
            raise GeometryError(f"data of shape {data.shape} does not fit region {roi}: expected {expected}")
        if data.dtype != self.meta.dtype:
            raise StorageError(f"cannot write {data.dtype} data into {self.url}, which holds {self.meta.dtype}")
        try:
            self._write(roi, data)
        except StorageError:
            raise
        except Exception as err:
            raise StorageError(f"cannot write region {roi} of {self.url}: {type(err).__name__}: {err}") from err

    @property
    @abstractmethod
    def provenance(self) -> dict[str, Any]:
        """What mitoseg recorded about how this volume was made (empty when nothing)."""

    @abstractmethod
    def set_provenance(self, record: dict[str, Any]) -> None:
        """Record how this volume was made (checkpoint, threshold, job)."""

    def require_complete(self, use: str) -> None:
        """Refuse to `use` a volume that a segment run recorded as partly written (it failed or still runs)."""
        if isinstance(self.provenance, dict) and self.provenance.get("complete") is False:
            raise BlockFailedError(
                f"{self.url} is incomplete: the segment run writing it has not written all its blocks (it failed or "
                f"still runs); run the same segment command again to finish it (done blocks are skipped) before {use}"
            )

    @abstractmethod
    def _read(self, roi: Roi) -> np.ndarray: ...

    @abstractmethod
    def _write(self, roi: Roi, data: np.ndarray) -> None: ...
