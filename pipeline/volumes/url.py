"""Parsing of volume names written as Neuroglancer data-source URLs.

`precomputed://file:///data/em`, `precomputed://gs://bucket/layer`, `zarr://file:///data/v.zarr/raw`,
`zarr2://…`, `zarr3://…`, or a plain local path (`data/v.zarr/raw`, a zarr array or group).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ConfigError
from pipeline.storage import redact

Kind = Literal["zarr", "precomputed"]
ZarrFormat = Literal[2, 3]

_SCHEMES: dict[str, tuple[Kind, ZarrFormat | None]] = {
    "precomputed": ("precomputed", None),
    "zarr": ("zarr", None),
    "zarr2": ("zarr", 2),
    "zarr3": ("zarr", 3),
}
_STORAGE = ("file://", "gs://", "s3://", "http://", "https://", "memory://")


@dataclass(frozen=True)
class VolumeURL:
    """A parsed volume name: the storage format, where it lives, and a forced zarr format if any."""

    kind: Kind
    location: str
    """Storage URL with its protocol, e.g. `file:///abs/path` or `gs://bucket/layer`."""
    zarr_format: ZarrFormat | None = None

    @property
    def is_local(self) -> bool:
        return self.location.startswith("file://")

    @property
    def local_path(self) -> str:
        """The filesystem path of a `file://` location."""
        if not self.is_local:
            raise ConfigError(f"{self.location} is not a local path; only file:// locations have one")
        return self.location[len("file://") :]

    def __str__(self) -> str:
        prefix = self.kind if self.zarr_format is None else f"zarr{self.zarr_format}"
        return f"{prefix}://{self.location}"


def parse_volume_url(url: str) -> VolumeURL:
    """Split a Neuroglancer-style volume URL into format, location and forced zarr format."""
    text = str(url).strip()
    if not text:
        raise ConfigError("an empty volume URL was given; expected e.g. zarr://file:///data/vol.zarr/raw")
    head, sep, rest = text.partition("://")
    if sep and head in _SCHEMES:
        kind, fmt = _SCHEMES[head]
        location = rest
        if not location.startswith(_STORAGE):
            if "://" in location:
                raise ConfigError(f"unsupported storage in {text!r}; supported: {', '.join(s[:-3] for s in _STORAGE)}")
            location = "file://" + os.path.abspath(location)
        if location.startswith(("s3://", "gs://")) and redact(location) != location:
            raise ConfigError(
                f"{redact(text)}: credentials (user info, signed queries) in s3:// and gs:// URLs are not used; "
                "give them as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, in ~/.aws/credentials or an instance "
                "role (GCS: application-default credentials), and name the volume without them"
            )
        return VolumeURL(kind, location.rstrip("/"), fmt)
    if sep:
        raise ConfigError(
            f"unsupported volume URL {text!r}: expected precomputed://, zarr://, zarr2://, zarr3:// "
            "or a plain local path"
        )
    path = os.path.abspath(text)
    detected: Kind = "precomputed" if os.path.isfile(os.path.join(path, "info")) else "zarr"
    return VolumeURL(detected, "file://" + path.rstrip("/"), None)
