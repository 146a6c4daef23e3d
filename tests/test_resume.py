"""Done-records (pipeline/resume.py) through cloud-files, for local paths and file:// URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.resume import DoneMarkers


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_done_records_round_trip(scheme: str, tmp_path: Path) -> None:
    output = f"{scheme}{tmp_path / 'out.zarr'}"
    markers = DoneMarkers(output, "job1")
    assert markers.load() == set()
    for block_id in (3, 0, 11):
        markers.mark(block_id)
    assert markers.load() == {0, 3, 11}
    assert (tmp_path / "out.zarr.mitoseg" / "done" / "job1" / "3").is_file()  # beside the output, travels with it
    assert DoneMarkers(output, "job2").load() == set()
    markers.clear()
    assert markers.load() == set()
