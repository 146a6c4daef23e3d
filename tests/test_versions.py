"""Versioned outputs: the pointer switch, what readers see, listing, switching back and pruning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.errors import ConfigError, StorageError
from pipeline.versions import (
    ORIGINAL,
    current_location,
    list_versions,
    pointer_location,
    prune,
    switch,
    target_for,
    version_location,
)
from pipeline.volumes import VolumeMeta, create_volume, open_volume, parse_volume_url, resolve_version

META = VolumeMeta(shape=(4, 8, 8), dtype=np.dtype("uint8"), chunks=(4, 8, 8))


def current(url: str):
    """The output at `url` as readers see it: its current version."""
    return open_volume(resolve_version(url))


def _write(location: str, value: int, key: str, created: float, complete: bool = True) -> None:
    volume = create_volume(f"zarr://{location}", META)
    volume.write(META.roi, np.full((1, 4, 8, 8), value, np.uint8))
    volume.set_provenance({"job_key": key, "created_at": created, "complete": complete})


@pytest.fixture
def output(tmp_path):
    url = f"zarr://file://{tmp_path}/probs.zarr"
    location = parse_volume_url(url).location
    _write(location, 1, "keyA", 1.0)
    return url, location


def test_unversioned_output_reads_itself(output):
    url, location = output
    assert current_location(location) == location
    assert [v.name for v in list_versions(url)] == [ORIGINAL]
    assert current(url).read(META.roi).max() == 1


def test_readers_see_the_old_version_until_the_pointer_switches(output):
    url, location = output
    assert target_for(url, "keyB") is None  # a changed job gets a new version beside the original
    _write(version_location(location, "keyB"), 2, "keyB", 2.0, complete=False)
    assert current(url).read(META.roi).max() == 1  # still the original, whole
    switch(location, "keyB")
    assert current(url).read(META.roi).max() == 2
    assert open_volume(url).read(META.roi).max() == 1  # the original is untouched
    pointer = json.loads(Path(pointer_location(location).removeprefix("file://")).read_text())
    assert pointer["version"] == "keyB"


def test_a_job_finds_its_own_version_again(output):
    url, location = output
    _write(version_location(location, "keyB"), 2, "keyB", 2.0)
    switch(location, "keyB")
    assert target_for(url, "keyA").name == ORIGINAL  # A -> B -> A: A's complete output is found, not redone
    assert target_for(url, "keyB").name == "keyB"
    assert [(v.name, v.current) for v in list_versions(url)] == [(ORIGINAL, False), ("keyB", True)]


def test_an_empty_location_gets_the_original(tmp_path):
    url = f"zarr://file://{tmp_path}/new.zarr"
    target = target_for(url, "keyA")
    assert target is not None and target.name == ORIGINAL


def test_prune_keeps_current_original_and_unfinished(output):
    url, location = output
    for n, key in enumerate(("k2", "k3", "k4"), start=2):
        _write(version_location(location, key), n, key, float(n))
    _write(version_location(location, "k5"), 5, "k5", 5.0, complete=False)
    switch(location, "k3")
    deleted = prune(url, keep=1)
    assert sorted(v.name for v in deleted) == ["k2", "k4"]
    assert sorted(v.name for v in list_versions(url)) == sorted([ORIGINAL, "k3", "k5"])
    assert current(url).read(META.roi).max() == 3


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda loc: version_location(loc, "../x"), ConfigError, "not a version name"),
        (lambda loc: prune(f"zarr://{loc}", keep=0), ConfigError, "keep at least"),
    ],
)
def test_bad_requests(output, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(output[1])


def test_a_damaged_pointer_is_an_error_not_the_original(output):
    url, location = output
    path = pointer_location(location).removeprefix("file://")
    switch(location, ORIGINAL)
    Path(path).write_text("{trunc")
    with pytest.raises(StorageError, match="version pointer"):
        current(url)


def test_cli_lists_switches_and_prunes(output):
    from pipeline.cli import app

    url, location = output
    _write(version_location(location, "keyB"), 2, "keyB", 2.0)
    runner = CliRunner()
    result = runner.invoke(app, ["versions", "switch", url, "keyB"])
    assert result.exit_code == 0, result.output
    listing = runner.invoke(app, ["versions", "list", url]).output
    assert "* keyB" in listing and "original" in listing
    assert runner.invoke(app, ["versions", "switch", url, "nope"]).exit_code != 0
    assert current(url).read(META.roi).max() == 2
