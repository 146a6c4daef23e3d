"""Done-records (pipeline/resume.py) through cloud-files and through the stand-in the GPU kit uses on the device."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from pipeline.resume import DoneMarkers

SHIM = Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "shim" / "cloudfiles.py"


def _shim_module():
    spec = importlib.util.spec_from_file_location("cloudfiles", SHIM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["cloud-files", "device shim"])
@pytest.mark.parametrize("scheme", ["", "file://"])
def test_done_records_round_trip(backend: str, scheme: str, tmp_path: Path, monkeypatch) -> None:
    if backend == "device shim":
        monkeypatch.setitem(sys.modules, "cloudfiles", _shim_module())
    output = f"{scheme}{tmp_path / 'out.zarr'}"
    markers = DoneMarkers(output, "job1")
    assert markers.load() == set()
    for block_id in (3, 0, 11):
        markers.mark(block_id)
    assert markers.load() == {0, 3, 11}
    assert DoneMarkers(output, "job2").load() == set()
    markers.clear()
    assert markers.load() == set()


def test_device_shim_refuses_remote_urls() -> None:
    with pytest.raises(ValueError, match="local paths only"):
        _shim_module().CloudFiles("gs://bucket/out.zarr.mitoseg/done/job")
