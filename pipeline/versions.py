"""Versioned outputs: a changed job writes a new version beside the last good one, then a pointer switches.

Layout for an output at location `L` (any storage `pipeline.storage` reaches):

- `L` itself: the first version ever written there (a plain volume, so an output that was never reprocessed
  looks exactly like any other volume);
- `L.versions/<version>`: later versions, one complete volume each, named by the job key that wrote them;
- `L.mitoseg/current.json`: the pointer, written once a version is complete. It names the current version and
  its location. Without a pointer the current version is `L`.

Readers (`view`, `evaluate`, `instances`) follow the pointer (`pipeline.volumes.resolve_version`), so they see
the previous version, whole, until the new one is finished and the pointer switches; inside a run every stage
addresses the exact version it writes.
The pointer is one small object replaced in one step: a rename on local files, a single PUT on object stores
(which replace an object atomically).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError, StorageError
from pipeline.storage import MissingFilesystemError, filesystem

log = logging.getLogger(__name__)

ORIGINAL = "original"
"""The name of the version stored at the output location itself."""


def versions_location(location: str) -> str:
    """Where the later versions of the output at `location` live."""
    return location.rstrip("/") + ".versions"


def pointer_location(location: str) -> str:
    """The pointer object naming the current version of the output at `location`."""
    from pipeline.resume import state_location

    return f"{state_location(location)}/current.json"


def version_location(location: str, version: str) -> str:
    """Storage location of one version of the output at `location`."""
    if version == ORIGINAL:
        return location.rstrip("/")
    if not version or "/" in version or version.startswith("."):
        raise ConfigError(f"{version!r} is not a version name of {location}: list them with `mitoseg versions list`")
    return f"{versions_location(location)}/{version}"


@dataclass(frozen=True)
class Pointer:
    """The current version of an output, as the pointer records it."""

    version: str
    location: str
    switched_at: float


def read_pointer(location: str) -> Pointer | None:
    """The pointer of the output at `location`, or None when it has never been switched."""
    fs, path = filesystem(pointer_location(location))
    try:
        if not fs.exists(path):
            return None
        record = json.loads(fs.cat_file(path))
        return Pointer(str(record["version"]), str(record["location"]), float(record["switched_at"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StorageError(
            f"the version pointer {pointer_location(location)} cannot be read ({type(err).__name__}: {err}); "
            f"repair it with `mitoseg versions switch {location} VERSION` (see `mitoseg versions list`)"
        ) from err


def current_location(location: str) -> str:
    """The storage location of the current version of the output at `location` (itself when unversioned)."""
    try:
        pointer = read_pointer(location)
    except MissingFilesystemError as err:  # e.g. precomputed on gs:// read by cloud-volume without gcsfs
        log.warning("cannot look for a version pointer of %s (%s); reading it as unversioned", location, err)
        return location.rstrip("/")
    return location.rstrip("/") if pointer is None else pointer.location


def switch(location: str, version: str) -> Pointer:
    """Make `version` the current version of the output at `location`, in one atomic replacement."""
    target = version_location(location, version)
    pointer = Pointer(version, target, time.time())
    fs, path = filesystem(pointer_location(location))
    data = json.dumps({"version": pointer.version, "location": pointer.location, "switched_at": pointer.switched_at})
    try:
        fs.makedirs(fs._parent(path), exist_ok=True)
        if fs.protocol == "file" or "file" in fs.protocol:
            tmp = f"{path}.{time.time_ns():x}.tmp"
            fs.pipe_file(tmp, data.encode())
            fs.mv(tmp, path)  # a rename: readers see the old pointer or the new one, never a partial file
        else:
            fs.pipe_file(path, data.encode())  # one PUT replaces an object atomically
    except OSError as err:
        raise StorageError(f"cannot switch {location} to version {version}: {err}") from err
    return pointer


def show_written(location: str, written: str) -> str | None:
    """Switch the output at `location` to the version stored at `written` unless it is current already; return
    the name of the version switched to (None when nothing changed)."""
    written = written.rstrip("/")
    if current_location(location) == written:
        return None
    name = ORIGINAL if written == location.rstrip("/") else written.rsplit("/", 1)[-1]
    switch(location, name)
    return name


def job_location(url: str, job_key: str) -> str:
    """Where the job `job_key` writes the output `url` that holds another job's result: its own earlier version,
    or a new one beside the others."""
    from pipeline.volumes import parse_volume_url

    found = target_for(url, job_key)
    return found.location if found is not None else version_location(parse_volume_url(url).location, job_key)


def unpoint(location: str) -> None:
    """Remove the pointer of the output at `location`, so that the output location itself is current again
    (before an explicit overwrite of it)."""
    fs, path = filesystem(pointer_location(location))
    try:
        if fs.exists(path):
            fs.rm(path)
    except OSError as err:
        raise StorageError(f"cannot remove the version pointer {pointer_location(location)}: {err}") from err


@dataclass(frozen=True)
class Version:
    """One stored version of an output and what its provenance says about it."""

    name: str
    location: str
    current: bool
    provenance: dict[str, Any]

    @property
    def complete(self) -> bool:
        return self.provenance.get("complete") is not False


def _provenance(kind_prefix: str, location: str) -> dict[str, Any] | None:
    """The provenance of the volume stored at `location`, or None when no volume is there."""
    from pipeline.volumes import open_volume

    try:
        return dict(open_volume(f"{kind_prefix}://{location}").provenance)
    except StorageError:
        return None


def list_versions(url: str) -> list[Version]:
    """Every stored version of the output volume `url`, the original first, then by name."""
    from pipeline.volumes import parse_volume_url

    parsed = parse_volume_url(url)
    location = parsed.location
    prefix = str(parsed).split("://", 1)[0]
    current = current_location(location)
    names = [ORIGINAL]
    fs, path = filesystem(versions_location(location))
    if fs.exists(path):
        names += sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
    found = []
    for name in names:
        where = version_location(location, name)
        provenance = _provenance(prefix, where)
        if provenance is not None:
            found.append(Version(name, where, where == current, provenance))
    return found


def target_for(url: str, job_key: str) -> Version | None:
    """The version a job with key `job_key` writes into the output `url`; None means a new one at `L.versions/KEY`.

    A job that already has a version (finished, or interrupted) goes on in it, so a re-run resumes and a return to
    an earlier network finds its complete output; an output location that holds nothing gets the original.
    """
    versions = list_versions(url)
    for version in versions:
        if version.provenance.get("job_key") == job_key:
            return version
    if not versions:
        from pipeline.volumes import parse_volume_url

        location = parse_volume_url(url).location
        return Version(ORIGINAL, location, True, {})
    return None


def prune(url: str, keep: int) -> list[Version]:
    """Delete complete versions of the output `url` beyond the newest `keep`; return what was deleted.

    Never deleted: the current version, the original at the output location (deleting it would leave no volume
    there) and incomplete versions (a run may still be writing one). Only this command deletes versions; runs
    never do.
    """
    if keep < 1:
        raise ConfigError(f"--keep {keep}: keep at least the current version (1)")
    versions = list_versions(url)
    newest_first = sorted(versions, key=lambda v: float(v.provenance.get("created_at", 0.0)), reverse=True)
    kept = {v.name for v in newest_first[:keep]}
    deleted = [v for v in newest_first if v.name not in kept and not v.current and v.name != ORIGINAL and v.complete]
    for version in deleted:
        for where in (version.location, version.location + ".mitoseg"):
            fs, path = filesystem(where)
            if fs.exists(path):
                fs.rm(path, recursive=True)
    return deleted
