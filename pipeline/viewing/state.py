"""The Neuroglancer viewer state (JSON) for a set of volumes: pure, no storage access.

The first image layer is shown in grey (the EM image); later image layers (probability maps) are drawn
on top in colour, channel 0 by default; segmentation layers list their segments in the side panel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.storage import browser_location
from pipeline.volumes import VolumeMeta, VolumeURL

NM_PER_M = 1e9
OVERLAY_COLORS = ("#00ff00", "#ff00ff", "#00ffff", "#ffff00")
_CROSS_SECTION_PIXELS = 400
"""Roughly the width in screen pixels of one panel of the 4-panel layout."""


@dataclass(frozen=True)
class Layer:
    """One volume as a Neuroglancer layer: what the state shows, and where a local volume is served."""

    name: str
    url: VolumeURL
    meta: VolumeMeta
    zarr_axes: tuple[str, ...] = ()
    """Stored axis order of a zarr source (e.g. c, z, y, x); empty for precomputed."""
    plain_zarr_names: tuple[str, ...] = ()
    """Neuroglancer's names for the dimensions of a zarr array without OME-Zarr metadata (empty otherwise):
    such an array gets its voxel size and offset from the state."""
    mesh_companion: str | None = None
    """Path of the precomputed meshes folder of a zarr segmentation, relative to the volume (a second source)."""
    segments: tuple[int, ...] = ()
    """Segment IDs shown (with their meshes) when the page opens."""
    http_base: str | None = None
    """Address of the `DataServer` that serves a local volume at `<http_base>/<name>`."""

    def served_from(self, http_base: str) -> Layer:
        """This layer with its local volume served by the `DataServer` at `http_base`."""
        return replace(self, http_base=http_base)

    @property
    def _served(self) -> str | None:
        return f"{self.http_base.rstrip('/')}/{self.name}" if self.http_base and self.url.is_local else None

    @property
    def source(self) -> str:
        """Neuroglancer data-source URL, e.g. `precomputed://http://127.0.0.1:8000/raw` or `zarr://gs://b/v.zarr/p`."""
        return neuroglancer_source(self.url, self._served)

    @property
    def extra_sources(self) -> tuple[str, ...]:
        """More data sources of the layer: the precomputed meshes and segment properties of a zarr segmentation."""
        if not self.mesh_companion:
            return ()
        return (f"precomputed://{self._served or browser_location(self.url.location)}/{self.mesh_companion}",)


def neuroglancer_source(url: VolumeURL, http_base: str | None = None) -> str:
    """The Neuroglancer data-source URL of a volume; local volumes need the `http_base` they are served at."""
    prefix = url.kind if url.zarr_format is None else f"zarr{url.zarr_format}"
    if url.is_local:
        if http_base is None:
            raise ValueError(f"{url} is a local volume: give the http address it is served at")
        return f"{prefix}://{http_base.rstrip('/')}"
    return f"{prefix}://{browser_location(url.location)}"


def _dimensions(voxel_size_nm: tuple[float, float, float]) -> dict[str, list[Any]]:
    z, y, x = voxel_size_nm
    return {"x": [x / NM_PER_M, "m"], "y": [y / NM_PER_M, "m"], "z": [z / NM_PER_M, "m"]}


def _value_range(dtype: np.dtype) -> list[float]:
    if np.issubdtype(dtype, np.integer):
        return [0, float(np.iinfo(dtype).max)]
    return [0.0, 1.0]


def overlay_shader(color: str, value_range: list[float], num_channels: int) -> str:
    """A shader drawing channel 0 of a probability map in `color`, transparent where it is zero."""
    channel = ", channel=[0]" if num_channels > 1 else ""
    lo, hi = value_range
    return (
        f"#uicontrol invlerp prob(range=[{lo:g}, {hi:g}]{channel})\n"
        f'#uicontrol vec3 color color(default="{color}")\n'
        "void main() {\n  float v = clamp(prob(), 0.0, 1.0);\n  emitRGBA(vec4(color * v, v));\n}\n"
    )


def _source(spec: Layer, channel_name: str) -> dict[str, Any] | str:
    """The layer's main source; zarr sources get their channel axis (and voxel size, offset) through a transform."""
    if not spec.zarr_axes:
        return spec.source
    size = dict(zip(("z", "y", "x"), spec.meta.voxel_size_nm, strict=True))
    offset = dict(zip(("z", "y", "x"), spec.meta.voxel_offset, strict=True))

    def scale(axis: str) -> list[Any]:
        return [1, ""] if axis == "c" else [size[axis] / NM_PER_M, "m"]

    outputs = {(channel_name if a == "c" else a): scale(a) for a in spec.zarr_axes}
    transform: dict[str, Any] = {"outputDimensions": outputs}
    if spec.plain_zarr_names:
        rank = len(spec.zarr_axes)
        transform["inputDimensions"] = dict(zip(spec.plain_zarr_names, outputs.values(), strict=True))
        transform["matrix"] = [
            [1 if j == i else 0 for j in range(rank)] + [offset.get(a, 0)] for i, a in enumerate(spec.zarr_axes)
        ]
    return {"url": spec.source, "transform": transform}


def build_state(layers: list[Layer], layout: str = "4panel") -> dict[str, Any]:
    """A Neuroglancer state showing `layers`, in the first layer's voxel size, centred on its volume."""
    if not layers:
        raise ValueError("build_state needs at least one layer")
    first = layers[0].meta
    centre_zyx = [o + s / 2 for o, s in zip(first.voxel_offset, first.shape, strict=True)]
    extent_nm = max(s * r for s, r in zip(first.shape, first.voxel_size_nm, strict=True))
    state: dict[str, Any] = {
        "dimensions": _dimensions(first.voxel_size_nm),
        "position": centre_zyx[::-1],
        "crossSectionScale": max(first.shape[1:]) / _CROSS_SECTION_PIXELS,
        "projectionScale": 2.0 * extent_nm / first.voxel_size_nm[2],
        "layers": [],
        "layout": layout,
    }
    images = 0
    for spec in layers:
        meta = spec.meta
        if meta.layer_type == "segmentation":
            layer: dict[str, Any] = {
                "type": "segmentation",
                "name": spec.name,
                "source": [_source(spec, "c'"), *spec.extra_sources] if spec.extra_sources else _source(spec, "c'"),
                "tab": "segments",
                "segments": [str(s) for s in spec.segments],
            }
            state["selectedLayer"] = {"layer": spec.name, "visible": True}
        else:
            layer = {"type": "image", "name": spec.name, "source": _source(spec, "c^")}
            if images:
                color = OVERLAY_COLORS[(images - 1) % len(OVERLAY_COLORS)]
                layer |= {
                    "blend": "additive",
                    "opacity": 0.7,
                    "shader": overlay_shader(color, _value_range(meta.dtype), meta.num_channels),
                }
            images += 1
        state["layers"].append(layer)
    return state
