"""The in-process LocalCluster: what it leaves behind in the caller's process."""

from __future__ import annotations

import os

import pytest

from pipeline.cluster import dask_client

pytestmark = pytest.mark.cluster


def test_local_cluster_gives_back_the_callers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dask's nanny writes the workers' pre-spawn variables into this process; they must not outlive the cluster."""
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    with dask_client(workers=1) as client:
        assert client.submit(os.environ.get, "MALLOC_MMAP_MAX_").result() == "0"  # the worker got it
        assert os.environ.get("MALLOC_MMAP_MAX_") == "0"  # and the nanny leaked it here
    assert "MALLOC_MMAP_MAX_" not in os.environ
    assert os.environ["OMP_NUM_THREADS"] == "7"
