"""The network's input contract: raw intensities as float32 in [0, 1], one function for training and inference.

Bad input is refused loudly rather than predicted on: chunks missing from storage, NaN or infinite voxels, float
intensities outside [0, 1] (unless an explicit `input_range` maps them there) and voxel sizes far from the one the
network was trained at.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from pathlib import Path

    from daisy import Roi

    from pipeline.volumes import Volume

log = logging.getLogger(__name__)

InputRange = tuple[float, float]


@dataclass(frozen=True)
class InputChecks:
    """How a worker reads the input of a segment run (small; travels with the job)."""

    fill_missing: bool = False
    """Read chunks absent from storage as the fill value instead of failing."""
    input_range: InputRange | None = None
    """Intensities (low, high) mapped to [0, 1]; None: integers by their type's maximum, floats as they are."""

    def reader(self, volume: Volume) -> Callable[[Roi], np.ndarray]:
        """`volume.read`, refusing regions with chunks absent from storage unless `fill_missing`.

        The StorageError names the missing chunks (offset:shape, z,y,x voxels) and what to do.
        """
        from pipeline.geometry import roi_key

        def read(region: Roi) -> np.ndarray:
            missing = [] if self.fill_missing else volume.missing_chunks(region)
            if missing:
                listed = ", ".join(roi_key(chunk) for chunk in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise StorageError(
                    f"input {volume.url} has no stored chunk {listed}{more} (z,y,x voxels offset:shape), needed for "
                    f"region {roi_key(region)}: the data is missing or was never written (zarr also leaves out "
                    "chunks that hold only the fill value); write the missing chunks, exclude them with a region "
                    "of interest, or set fill_missing: true to read them as the fill value"
                )
            return volume.read(region)

        return read

    def scale(self, raw: np.ndarray, volume: Volume, roi: Roi) -> np.ndarray:
        """`scale_input` with this job's `input_range`; errors name the input and the region `raw` was read from."""
        from pipeline.geometry import roi_key

        return scale_input(raw, self.input_range, f"input {volume.url} region {roi_key(roi)}")


def scale_input(raw: np.ndarray, input_range: InputRange | None = None, where: str = "the input") -> np.ndarray:
    """Raw intensities as float32 in [0, 1] (integers divided by their type's maximum, or `input_range` mapped).

    Raises StorageError naming `where` for NaN or infinite voxels and for values outside [0, 1] after scaling: a
    float volume holding 0..255 predicted as if it held 0..1 gives a silently wrong (often empty) output.
    """
    if input_range is not None:
        low, high = input_range
        scaled = (raw.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    elif np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)
    else:
        scaled = raw.astype(np.float32)
    if not np.isfinite(scaled).all():
        bad = int(np.count_nonzero(~np.isfinite(raw)))
        raise StorageError(
            f"{where} holds {bad} NaN or infinite voxel(s); the network cannot predict on them: repair the input "
            "(e.g. replace them by the background intensity) or exclude that part with a region of interest"
        )
    lo, hi = float(scaled.min(initial=0.0)), float(scaled.max(initial=0.0))
    if lo < 0.0 or hi > 1.0:
        found = (float(raw.min()), float(raw.max()))
        if input_range is None:
            hint = (
                "the network reads intensities in [0, 1]: set input_range to the range the input holds "
                "(e.g. input_range: [0, 255] for 8-bit values) and it is mapped to [0, 1]"
            )
        else:
            hint = f"input_range {list(input_range)} must cover every value: widen it"
        raise StorageError(f"{where} holds {raw.dtype} values from {found[0]:g} to {found[1]:g}; {hint}")
    return scaled


VOXEL_SIZE_TOLERANCE = 0.25
"""The default largest relative difference per axis between two voxel sizes that count as the same."""


def recorded_voxel_size(volume: Volume) -> tuple[float, float, float] | None:
    """The voxel size (z, y, x) in nm the input's metadata records, or None when it records none."""
    if volume.meta.extra.get("voxel_size_recorded") is False:
        return None
    return volume.meta.voxel_size_nm


def check_voxel_size(volume: Volume, checkpoint: str | Path, tolerance: float) -> None:
    """Refuse an input whose voxel size differs by more than `tolerance` (relative, per axis) from the one the
    checkpoint's network was trained at: such a network sees structures at the wrong scale and predicts wrongly.

    Passes with a warning when either size is unknown. Raises ConfigError naming both sizes and what to do.
    """
    from pipeline.network.checkpoint import trained_voxel_size

    trained_nm = trained_voxel_size(checkpoint)
    found = recorded_voxel_size(volume)
    if found is None or trained_nm is None:
        missing = f"input {volume.url}" if found is None else f"checkpoint {checkpoint}"
        log.warning("%s records no voxel size: cannot check it against the network's; the output may be wrong", missing)
        return
    off = voxel_size_difference(found, trained_nm)
    if max(off) <= tolerance:
        return
    axis = "zyx"[int(np.argmax(off))]
    level = _closer_level(volume, trained_nm, tolerance)
    if level is None:
        closer = f"resample the input to about {_nm(trained_nm)}"
    else:
        closer = f"read level {level} with input_scale: {level}, which is close to it"
    raise ConfigError(
        f"input {volume.url} has voxels of {_nm(found)} but checkpoint {checkpoint} was trained at {_nm(trained_nm)} "
        f"({max(off):.0%} off along {axis}, more than voxel_size_tolerance {tolerance:g}); its predictions at this "
        f"size would be wrong. Resampling is not supported yet: {closer}, use a network trained at this size, or "
        "raise voxel_size_tolerance if the recorded size is wrong"
    )


def voxel_size_difference(found: Sequence[float], trained: Sequence[float]) -> list[float]:
    """Per axis, how far `found` is from `trained` relative to `trained` (0.25 = 25 % off)."""
    return [abs(f - t) / t for f, t in zip(found, trained, strict=True)]


def _closer_level(volume: Volume, trained_nm: Sequence[float], tolerance: float, levels: int = 8) -> int | None:
    """The first scale level of a multiscale input (OME-Zarr level, precomputed mip) within `tolerance` of the
    network's voxel size, or None (only on the error path: opens each level's metadata)."""
    from pipeline.volumes import open_volume

    seen = set()
    for scale in range(levels):
        try:
            size = open_volume(volume.url, scale=scale).meta.voxel_size_nm
        except StorageError:
            return None
        if size in seen:  # a single-scale volume answers every level with itself
            return None
        seen.add(size)
        if max(voxel_size_difference(size, trained_nm)) <= tolerance:
            return scale
    return None


def _nm(size: Sequence[float]) -> str:
    return " x ".join(f"{s:g}" for s in size) + " nm (z, y, x)"
