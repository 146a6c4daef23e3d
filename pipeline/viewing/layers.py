"""The volumes a user asked to view, opened and checked, as Neuroglancer layers (reads metadata only)."""

from __future__ import annotations

import os
import re
from typing import Any

from pipeline.errors import StorageError
from pipeline.viewing.meshes import ZARR_COMPANION
from pipeline.viewing.state import Layer
from pipeline.volumes import VolumeURL, open_volume, parse_volume_url, resolve_version
from pipeline.volumes.precomputed_volume import PrecomputedVolume
from pipeline.volumes.zarr_volume import ZarrVolume

MAX_VISIBLE_SEGMENTS = 20
"""The largest objects of a segmentation are shown (with their meshes) when the page opens."""
_ZARR_METADATA = ("zarr.json", ".zarray", ".zgroup")


def _check_local(url: VolumeURL, text: str) -> None:
    path = url.local_path
    if not os.path.exists(path):
        raise StorageError(f"cannot view {text!r}: {path} does not exist; give the path of a mitoseg output volume")
    if url.kind == "precomputed" and not os.path.isfile(os.path.join(path, "info")):
        raise StorageError(
            f"cannot view {text!r}: {path} has no 'info' file, so it is not a precomputed layer; "
            "give the layer's folder (the one holding 'info')"
        )
    if url.kind == "zarr" and not any(os.path.isfile(os.path.join(path, m)) for m in _ZARR_METADATA):
        children = _child_volumes(path)
        if children:
            raise _not_one_volume(text, children)
        raise StorageError(
            f"cannot view {text!r}: {path} is not a volume: it has neither a precomputed 'info' file nor zarr "
            f"metadata ({', '.join(_ZARR_METADATA)}); give a precomputed layer, a zarr array or an OME-Zarr group"
        )


def _neuroglancer_dimension_names(array: Any) -> tuple[str, ...]:
    """The names Neuroglancer gives the dimensions of a plain zarr array: zarr v3 `dimension_names` or the v2
    `_ARRAY_DIMENSIONS` attribute, else `d<i>` (v2) or `dim_<i>` (v3)."""
    v2 = array.metadata.zarr_format == 2
    names = array.attrs.get("_ARRAY_DIMENSIONS") if v2 else array.metadata.dimension_names
    names = list(names or [None] * array.ndim)
    return tuple(str(n) if n else f"{'d' if v2 else 'dim_'}{i}" for i, n in enumerate(names))


def _child_volumes(path: str) -> list[str]:
    """Names of the folders directly inside `path` that hold a precomputed layer or zarr data."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return []
    markers = ("info", *_ZARR_METADATA)
    return [n for n in names if any(os.path.isfile(os.path.join(path, n, m)) for m in markers)]


def _not_one_volume(text: str, children: list[str]) -> StorageError:
    examples = " ".join(f"{text.rstrip('/')}/{c}" for c in children)
    return StorageError(f"cannot view {text!r}: it holds volumes but is not one; name them instead: {examples}")


def _visible_segments(properties_location: str) -> tuple[tuple[int, ...], bool]:
    """The largest segments listed in segment properties at `properties_location`, and whether it exists."""
    from cloudfiles import CloudFiles

    info = CloudFiles(properties_location).get_json("info")
    if not info:
        return (), False
    inline = info.get("inline", {})
    sizes = next((p["values"] for p in inline.get("properties", []) if p.get("id") == "size"), None)
    ids = [int(i) for i in inline.get("ids", [])]
    order = sorted(range(len(ids)), key=lambda k: -sizes[k]) if sizes else range(len(ids))
    return tuple(ids[k] for k in list(order)[:MAX_VISIBLE_SEGMENTS]), True


def _layer_name(url: VolumeURL, taken: set[str]) -> str:
    tail = [p for p in url.location.split("/") if p][-1]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", re.sub(r"\.(zarr|n5)$", "", tail)) or "volume"
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}_{n}", n + 1
    taken.add(unique)
    return unique


def open_layers(urls: list[str]) -> list[Layer]:
    """Open each volume (metadata only) and describe it as a layer; bad input raises StorageError."""
    layers: list[Layer] = []
    taken: set[str] = set()
    for text in urls:
        url = resolve_version(parse_volume_url(text))  # a reprocessed output shows its current version
        if url.is_local:
            _check_local(url, text)
        try:
            volume = open_volume(url)
        except StorageError as err:
            children = _child_volumes(url.local_path) if url.is_local else []
            if not children:
                raise
            raise _not_one_volume(text, children) from err
        meta = volume.meta
        zarr_axes: tuple[str, ...] = ()
        plain_zarr_names: tuple[str, ...] = ()
        if isinstance(volume, ZarrVolume):
            zarr_axes = tuple(volume.axes)
            if volume.node is volume.array:
                plain_zarr_names = _neuroglancer_dimension_names(volume.array)
        companion = None
        segments: tuple[int, ...] = ()
        if meta.layer_type == "segmentation":
            if isinstance(volume, PrecomputedVolume):
                props = volume.cv.info.get("segment_properties")
                if props:
                    segments, _ = _visible_segments(f"{url.location}/{props}")
            else:
                segments, found = _visible_segments(f"{url.location}/{ZARR_COMPANION}/segment_properties")
                companion = ZARR_COMPANION if found else None
        layers.append(Layer(_layer_name(url, taken), url, meta, zarr_axes, plain_zarr_names, companion, segments))
    return layers
