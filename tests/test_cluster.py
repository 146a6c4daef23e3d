"""Connecting to Dask: what workers are given, and what the caller's process keeps."""

from __future__ import annotations

import os

import dask
import pytest

from pipeline.cluster import dask_client, restored_environ, worker_environment


def test_worker_environment_sets_thread_pools_and_malloc_and_keeps_configured_variables() -> None:
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {"KEEP_ME": "1", "OMP_NUM_THREADS": "9"}}):
        environ = worker_environment(3)
    assert environ == {
        "KEEP_ME": "1",
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": str(2**36),
    }


def test_restored_environ_gives_back_values_and_absence_even_after_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MITOSEG_TEST_SET", "before")
    monkeypatch.delenv("MITOSEG_TEST_UNSET", raising=False)
    with pytest.raises(RuntimeError), restored_environ(["MITOSEG_TEST_SET", "MITOSEG_TEST_UNSET"]):
        os.environ["MITOSEG_TEST_SET"] = "changed"
        os.environ["MITOSEG_TEST_UNSET"] = "added"
        raise RuntimeError("the body failed")
    assert os.environ["MITOSEG_TEST_SET"] == "before"
    assert "MITOSEG_TEST_UNSET" not in os.environ


@pytest.mark.cluster
def test_local_workers_get_mitoseg_environment_and_the_caller_keeps_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers start with the variables of `worker_environment` that the caller has not set itself (Dask lets
    the caller's own values win); once the cluster is gone, the caller's environment is as it was."""
    names = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    with dask_client(workers=1) as client:
        got = client.submit(lambda: {name: os.environ.get(name) for name in names}).result()
    assert got == {name: worker_environment(max(1, os.cpu_count() or 1))[name] for name in names}
    assert not [name for name in names if name in os.environ]
    assert os.environ["MKL_NUM_THREADS"] == "7"
