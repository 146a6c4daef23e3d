"""Volume I/O: one reader/writer interface for zarr and precomputed, chosen by URL."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pipeline.volumes.base import Volume, VolumeMeta
from pipeline.volumes.url import VolumeURL, parse_volume_url

__all__ = [
    "Volume",
    "VolumeMeta",
    "VolumeURL",
    "check_layout",
    "create_volume",
    "open_volume",
    "parse_volume_url",
    "resolve_version",
    "volume_exists",
]


def _backend(url: VolumeURL) -> Any:
    if url.kind == "precomputed":
        from pipeline.volumes.precomputed_volume import PrecomputedVolume

        return PrecomputedVolume
    from pipeline.volumes.zarr_volume import ZarrVolume

    return ZarrVolume


def open_volume(url: str | VolumeURL, mode: str = "r", scale: int = 0) -> Volume:
    """Open the existing volume stored at `url` for reading (`mode="r"`) or reading and writing (`mode="r+"`).

    It opens exactly that location; a reader that should see a reprocessed output's current version asks
    `resolve_version` first (`view`, `evaluate` and `instances` do for the URLs a user gives).
    """
    parsed = url if isinstance(url, VolumeURL) else parse_volume_url(url)
    return _backend(parsed).open(parsed, mode=mode, scale=scale)


def resolve_version(url: str | VolumeURL) -> VolumeURL:
    """`url` at the current version of the output stored there (`pipeline.versions`; itself when unversioned)."""
    from pipeline.versions import current_location

    parsed = url if isinstance(url, VolumeURL) else parse_volume_url(url)
    location = current_location(parsed.location)
    return parsed if location == parsed.location else replace(parsed, location=location)


def create_volume(url: str | VolumeURL, meta: VolumeMeta, attributes: dict[str, Any] | None = None) -> Volume:
    """Create (or replace) a volume with the given metadata and return it open for writing."""
    parsed = url if isinstance(url, VolumeURL) else parse_volume_url(url)
    return _backend(parsed).create(parsed, meta, attributes)


def check_layout(url: str | VolumeURL, meta: VolumeMeta) -> None:
    """Refuse metadata whose layout (chunks, shards) cannot be created at `url`, without touching storage: for a
    job that creates its output only after hours of work (instances)."""
    parsed = url if isinstance(url, VolumeURL) else parse_volume_url(url)
    _backend(parsed).check_layout(parsed, meta)


def volume_exists(url: str | VolumeURL, scale: int = 0) -> bool:
    """Whether a volume (at scale level `scale`) can be opened at `url`."""
    from pipeline.errors import StorageError

    try:
        open_volume(url, scale=scale)
    except StorageError:
        return False
    return True
