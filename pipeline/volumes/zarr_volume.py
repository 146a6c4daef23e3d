"""Zarr volumes (v2 or v3, detected or forced), plain arrays and OME-Zarr multiscale groups."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import zarr
from daisy import Roi

from pipeline.errors import GeometryError, StorageError
from pipeline.geometry import as_zyx, chunk_rois
from pipeline.storage import storage_options
from pipeline.volumes.base import Volume, VolumeMeta
from pipeline.volumes.url import VolumeURL

PROVENANCE_KEY = "mitoseg"
SPATIAL = ("z", "y", "x")


def _store(url: VolumeURL, read_only: bool) -> Any:
    """A local path, or an fsspec store with the endpoint pipeline.storage gives (s3://, gs://, memory://)."""
    if url.is_local:
        return url.local_path
    from zarr.storage import FsspecStore

    try:
        return FsspecStore.from_url(url.location, storage_options=storage_options(url.location), read_only=read_only)
    except ImportError as err:
        raise StorageError(f"cannot reach {url}: {err}; install mitoseg[cloud] for s3:// and gs://") from err


def _ome_multiscales(attrs: dict[str, Any]) -> list[dict[str, Any]] | None:
    if "multiscales" in attrs:
        return attrs["multiscales"]
    ome = attrs.get("ome")
    if isinstance(ome, dict) and "multiscales" in ome:
        return ome["multiscales"]
    return None


def _axis_names(array: Any, attrs: dict[str, Any], ome_axes: list[Any] | None) -> list[str]:
    """Axis names of an array from OME axes, zarr v3 dimension names or common attributes."""
    names: Any = None
    if ome_axes:
        names = [a["name"] if isinstance(a, dict) else a for a in ome_axes]
    elif getattr(array.metadata, "dimension_names", None):
        names = list(array.metadata.dimension_names)
    else:
        names = attrs.get("axes") or attrs.get("_ARRAY_DIMENSIONS")
    if names is None:
        return ["c", *SPATIAL] if array.ndim == 4 else list(SPATIAL)
    names = ["c" if str(n).lower() in ("c", "c^", "channel", "channels") else str(n).lower() for n in names]
    return names


def _scale_of(dataset: dict[str, Any]) -> list[float] | None:
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            return [float(s) for s in t["scale"]]
    return None


def ome_multiscales_attrs(meta: VolumeMeta, factors: list[Any], zarr_format: int) -> dict[str, Any]:
    """OME-Zarr multiscales metadata (v0.4 for zarr v2, v0.5 for v3) for levels `s0`, `s1`, ….

    `factors[k]` is level k's down-sampling factor against level 0, one number or (z, y, x).
    Units are nanometres so that Neuroglancer places the volume correctly.
    """
    datasets = []
    for level, factor in enumerate(factors):
        f = [factor] * 3 if isinstance(factor, int | float) else list(factor)
        scale = [float(r) * float(k) for r, k in zip(meta.voxel_size_nm, f, strict=True)]
        # Neuroglancer reads an OME translation as the centre of the first voxel and shifts it by half a
        # voxel; this places every level exactly where the precomputed layers of the same data are.
        shift = [o * r + s / 2 for o, r, s in zip(meta.voxel_offset, meta.voxel_size_nm, scale, strict=True)]
        datasets.append(
            {
                "path": f"s{level}",
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, *scale]},
                    {"type": "translation", "translation": [0.0, *shift]},
                ],
            }
        )
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "nanometer"} for a in SPATIAL]
    version = "0.4" if zarr_format == 2 else "0.5"
    multiscales = [{"version": version, "name": "", "axes": axes, "datasets": datasets}]
    if zarr_format == 2:
        return {"multiscales": multiscales}
    return {"ome": {"version": version, "multiscales": [{k: v for k, v in multiscales[0].items() if k != "version"}]}}


class ZarrVolume(Volume):
    """A zarr array seen as (channels, z, y, x), whatever its stored axis order."""

    def __init__(self, url: VolumeURL, array: Any, meta: VolumeMeta, axes: list[str], node: Any = None):
        super().__init__(url, meta)
        self.array = array
        self.node = array if node is None else node
        """The group (OME-Zarr) or array that carries the volume's attributes and provenance."""
        self.axes = axes
        want = ["c", *SPATIAL] if "c" in axes else list(SPATIAL)
        self._to_czyx = [axes.index(a) for a in want]
        self._from_czyx = [want.index(a) for a in axes]

    @classmethod
    def open(cls, url: VolumeURL, mode: str = "r", scale: int = 0) -> ZarrVolume:
        """Open an existing array, or scale `scale` of an OME-Zarr multiscale group."""
        try:
            node = zarr.open(_store(url, mode == "r"), mode="r" if mode == "r" else "r+", zarr_format=url.zarr_format)
        except FileNotFoundError as err:
            raise StorageError(f"no zarr array or group at {url}: check the path") from err
        except Exception as err:
            raise StorageError(f"cannot open {url} as zarr: {err}") from err
        top = node
        attrs = dict(node.attrs)
        ome_axes = None
        scale_nm: list[float] | None = None
        if isinstance(node, zarr.Group):
            multiscales = _ome_multiscales(attrs)
            if not multiscales:
                members = sorted(k for k, _ in node.arrays())
                raise StorageError(
                    f"{url} is a zarr group without OME-Zarr multiscales; name one of its arrays "
                    f"instead: {members or 'it has none'}"
                )
            datasets = multiscales[0]["datasets"]
            if not 0 <= scale < len(datasets):
                raise StorageError(f"{url} has scale levels 0..{len(datasets) - 1}; scale {scale} was asked for")
            ome_axes = multiscales[0].get("axes")
            scale_nm = _scale_of(datasets[scale])
            base_nm = _scale_of(datasets[0])
            offset: Any = attrs.get("voxel_offset")
            if scale and scale_nm and base_nm and isinstance(offset, list) and len(offset) == 3:
                # the group's offset counts level-0 voxels; level `scale` starts at the same place in its own
                # (larger) voxels. OME puts the spatial axes last.
                per_axis = zip(offset, base_nm[-3:], scale_nm[-3:], strict=True)
                attrs["voxel_offset"] = [round(float(o) * b / s) for o, b, s in per_axis]
            node = node[datasets[scale]["path"]]
            attrs = {**attrs, **dict(node.attrs)}
        return cls(url, node, *cls._meta(url, node, attrs, ome_axes, scale_nm), node=top)

    @staticmethod
    def _meta(
        url: VolumeURL, array: Any, attrs: dict[str, Any], ome_axes: Any, scale_nm: list[float] | None
    ) -> tuple[VolumeMeta, list[str]]:
        if array.ndim not in (3, 4):
            raise StorageError(
                f"{url} has {array.ndim} dimensions (shape {array.shape}); mitoseg needs a 3D volume "
                "(z, y, x) or (c, z, y, x)"
            )
        axes = _axis_names(array, attrs, ome_axes)
        if len(axes) != array.ndim or sorted(a for a in axes if a != "c") != sorted(SPATIAL):
            raise StorageError(f"{url} has axes {axes}; expected z, y, x and at most one channel axis c")
        spatial_idx = [axes.index(a) for a in SPATIAL]
        shape = tuple(int(array.shape[i]) for i in spatial_idx)
        chunks = tuple(int(array.chunks[i]) for i in spatial_idx)
        shards = tuple(int(array.shards[i]) for i in spatial_idx) if getattr(array, "shards", None) else None
        channels = int(array.shape[axes.index("c")]) if "c" in axes else 1
        if scale_nm is not None:
            res = [scale_nm[i] for i in spatial_idx]
        else:
            res = attrs.get("resolution_nm") or attrs.get("voxel_size") or attrs.get("resolution") or [1, 1, 1]
        stored = [a for a in axes if a != "c"]  # attributes list spatial axes in stored order
        if scale_nm is None:
            res = [float(dict(zip(stored, res, strict=False))[a]) for a in SPATIAL]
        if "voxel_offset" in attrs:
            try:
                stored_offset = as_zyx(attrs["voxel_offset"], f"{url} attribute voxel_offset")
            except GeometryError as err:  # a stored attribute that cannot be read: the volume cannot be opened
                raise StorageError(str(err)) from err
            by_axis = dict(zip(stored, stored_offset, strict=True))
            offset = tuple(by_axis[a] for a in SPATIAL)
        elif "offset" in attrs:
            by_axis = dict(zip(stored, attrs["offset"], strict=False))
            offset = tuple(int(round(float(by_axis[a]) / r)) for a, r in zip(SPATIAL, res, strict=True))
        else:
            offset = (0, 0, 0)
        recorded = scale_nm is not None or any(attrs.get(k) for k in ("resolution_nm", "voxel_size", "resolution"))
        meta = VolumeMeta(
            shape=shape,  # type: ignore[arg-type]
            dtype=np.dtype(array.dtype),
            chunks=chunks,  # type: ignore[arg-type]
            num_channels=channels,
            voxel_size_nm=tuple(res),  # type: ignore[arg-type]
            voxel_offset=offset,  # type: ignore[arg-type]
            layer_type=attrs.get("layer_type", "image"),
            shards=shards,  # type: ignore[arg-type]
            extra={} if recorded else {"voxel_size_recorded": False},  # 1 nm is a guess: checks warn
        )
        return meta, axes

    @classmethod
    def check_layout(cls, url: VolumeURL, meta: VolumeMeta) -> None:
        """Shards need zarr v3 (`zarr3://`, or `zarr://` for a new volume) and whole chunks."""
        if meta.shards is not None and url.zarr_format == 2:
            raise StorageError(
                f"cannot create {url} with shards {meta.shards}: zarr v2 has no sharding; "
                "use a zarr3:// (or zarr://) output, or leave shard_size unset"
            )
        super().check_layout(url, meta)

    @classmethod
    def create(cls, url: VolumeURL, meta: VolumeMeta, attributes: dict[str, Any] | None = None) -> ZarrVolume:
        """Create an OME-Zarr multiscale group holding scale 0 as a (channels, z, y, x) array `s0`.

        Each chunk holds all channels of a (z, y, x) chunk; pyramid levels are added by the viewing stage.
        With `meta.shards`, s0 uses zarr v3 sharding: one file per shard of whole chunks.
        """
        cls.check_layout(url, meta)
        fmt = url.zarr_format or 3
        attrs = {
            **ome_multiscales_attrs(meta, [1], fmt),
            "resolution_nm": list(meta.voxel_size_nm),
            "voxel_offset": list(meta.voxel_offset),
            "layer_type": meta.layer_type,
            **(attributes or {}),
        }
        kwargs: dict[str, Any] = {"dimension_names": ["c", *SPATIAL]} if fmt == 3 else {}
        if meta.shards is not None:
            kwargs["shards"] = (meta.num_channels, *meta.shards)
        try:
            group = zarr.open_group(_store(url, False), mode="w", zarr_format=fmt, attributes=attrs)
            array = group.create_array(
                "s0",
                shape=(meta.num_channels, *meta.shape),
                chunks=(meta.num_channels, *meta.chunks),
                dtype=meta.dtype,
                fill_value=0,
                **kwargs,
            )
        except Exception as err:
            raise StorageError(f"cannot create zarr volume {url}: {err}; check that the location is writable") from err
        return cls(url, array, meta, ["c", *SPATIAL], node=group)

    def _index(self, roi: Roi) -> tuple[slice, ...]:
        spatial = {a: slice(b, e) for a, b, e in zip(SPATIAL, roi.begin, roi.end, strict=True)}
        return tuple(spatial.get(a, slice(None)) for a in self.axes)

    def _read(self, roi: Roi) -> np.ndarray:
        data = np.asarray(self.array[self._index(roi)]).transpose(self._to_czyx)
        return data if "c" in self.axes else data[None]

    def missing_chunks(self, roi: Roi) -> list[Roi]:
        """The stored chunks (shards of a sharded array) of `roi` whose keys are absent from the store."""
        from zarr.core.sync import sync

        grid = dict(zip(self.axes, self.array.shards or self.array.chunks, strict=True))
        cells = list(chunk_rois(roi, [grid[a] for a in SPATIAL], within=self.meta.roi))
        prefix = f"{self.array.path}/" if self.array.path else ""
        channels = range(-(-self.meta.num_channels // grid["c"])) if "c" in grid else range(1)

        def key(cell: Roi, channel: int) -> str:
            index = tuple(channel if a == "c" else cell.begin[SPATIAL.index(a)] // grid[a] for a in self.axes)
            return prefix + self.array.metadata.encode_chunk_key(index)

        keys = [[key(cell, channel) for channel in channels] for cell in cells]

        async def exists() -> list[bool]:
            flat = [key for group in keys for key in group]
            found = dict(zip(flat, await asyncio.gather(*(self.array.store.exists(k) for k in flat)), strict=True))
            return [all(found[k] for k in group) for group in keys]

        return [cell for cell, present in zip(cells, sync(exists()), strict=True) if not present]

    def _write(self, roi: Roi, data: np.ndarray) -> None:
        if "c" not in self.axes:
            data = data[0]
        self.array[self._index(roi)] = np.ascontiguousarray(data.transpose(self._from_czyx))

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.node.attrs.get(PROVENANCE_KEY, {}))

    def set_provenance(self, record: dict[str, Any]) -> None:
        try:
            self.node.attrs[PROVENANCE_KEY] = record
        except Exception as err:
            raise StorageError(f"cannot record provenance on {self.url}: {err}; open it with mode='r+'") from err
