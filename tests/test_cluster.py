"""Connecting to Dask: what workers are given, and what the caller's process keeps."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import dask
import pytest
from pydantic import ValidationError

from pipeline.cli.segment import ClusterKind, cluster_overrides
from pipeline.cluster import (
    batch_job_options,
    dask_client,
    restored_environ,
    terminate_raises,
    walltime_seconds,
    worker_environment,
)
from pipeline.config import load_config
from pipeline.config.cluster import AddressClusterConfig, BatchClusterConfig, LocalClusterConfig
from pipeline.config.segment import SegmentConfig
from pipeline.errors import ConfigError


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
    with dask_client(LocalClusterConfig(workers=1)) as client:
        got = client.submit(lambda: {name: os.environ.get(name) for name in names}).result()
    assert got == {name: worker_environment(max(1, os.cpu_count() or 1))[name] for name in names}
    assert not [name for name in names if name in os.environ]
    assert os.environ["MKL_NUM_THREADS"] == "7"


def segment_job(**fields: object) -> SegmentConfig:
    return SegmentConfig.model_validate({"input": "a.zarr/raw", "output": "b.zarr/p", **fields})


@pytest.mark.parametrize(
    ("fields", "cluster"),
    [
        ({}, LocalClusterConfig()),
        ({"workers": 3}, LocalClusterConfig(workers=3)),
        ({"scheduler": "tcp://h:8786"}, AddressClusterConfig(kind="address", address="tcp://h:8786")),
        ({"cluster": {"kind": "local", "min_workers": 2}, "workers": 4}, LocalClusterConfig(workers=4, min_workers=2)),
        (
            {"cluster": {"kind": "slurm", "max_jobs": 3, "wait_s": 5}, "scheduler": "tcp://h:1"},
            AddressClusterConfig(kind="address", address="tcp://h:1", wait_s=5),
        ),
    ],
)
def test_workers_and_scheduler_are_short_for_a_cluster_section(fields: dict, cluster: object) -> None:
    assert segment_job(**fields).cluster == cluster


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"workers": 2, "scheduler": "tcp://h:1"}, "exclude each other"),
        ({"cluster": {"kind": "slurm"}, "workers": 2}, "size a batch cluster with cluster.max_jobs"),
        ({"cluster": {"kind": "slurm", "min_jobs": 3, "max_jobs": 2}}, "min_jobs 3 is more than max_jobs 2"),
        ({"cluster": {"kind": "slurm", "min_workers": 3, "max_jobs": 2}}, "min_workers 3 cannot join"),
        ({"cluster": {"kind": "slurm", "gpus_per_job": 2}}, "one GPU per job"),
        ({"cluster": {"kind": "slurm", "walltime": "1 hour"}}, "String should match pattern"),
        ({"cluster": {"kind": "yarn"}}, "does not match any of the expected tags"),
        ({"instances": {"cluster": {"kind": "local"}}}, "runs on segment's own cluster"),
    ],
)
def test_bad_cluster_sections_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        segment_job(**fields)


def test_cluster_options_start_a_new_section_or_set_fields() -> None:
    assert cluster_overrides(None, max_jobs=None, queue="gpu") == {"cluster.queue": "gpu"}
    slurm = cluster_overrides(ClusterKind.slurm, max_jobs=8, gpus_per_job=1, queue=None)
    assert slurm["cluster"] == {"kind": "slurm", "max_jobs": 8, "gpus_per_job": 1}
    assert cluster_overrides(None, scheduler_file="/s.json")["cluster"] == {
        "kind": "scheduler_file",
        "scheduler_file": "/s.json",
    }


def test_a_cluster_option_replaces_the_job_files_cluster_and_its_short_forms(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("input: a.zarr/raw\noutput: b.zarr/p\nworkers: 2\ncluster: {kind: local, memory_limit: 2GiB}\n")
    cfg = load_config(SegmentConfig, job, cluster_overrides(ClusterKind.slurm, max_jobs=4))
    assert cfg.cluster == BatchClusterConfig(kind="slurm", max_jobs=4)


@pytest.mark.parametrize(("text", "seconds"), [("01:00:00", 3600), ("1-02:03:04", 93784), ("00:10", 600)])
def test_walltime_seconds(text: str, seconds: int) -> None:
    assert walltime_seconds(text) == seconds


def test_batch_workers_retire_before_the_walltime_with_mitoseg_environment() -> None:
    cluster = BatchClusterConfig(
        kind="slurm", cores=4, walltime="00:20:00", lifetime_margin_s=120, gpus_per_job=1, account="lab",
        job_script_prologue=["module load cuda"],
    )  # fmt: skip
    options = batch_job_options(cluster)
    args = options["worker_extra_args"]
    assert args[args.index("--lifetime") + 1] == "1080s"  # 20 min less the 2 min margin
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert "--lifetime-restart" not in args  # a retired worker's job ends; the adaptive cluster starts a new one
    assert options["job_extra_directives"] == ["--gres=gpu:1"] and options["account"] == "lab"
    prologue = options["job_script_prologue"]
    assert prologue[0] == "module load cuda"
    assert {"export OMP_NUM_THREADS=4", "export MITOSEG_TORCH_THREADS=4", "export MALLOC_MMAP_MAX_=0"} <= set(prologue)
    assert "queue" not in options  # unset fields are left to the site's defaults
    assert options["job_name"] == "mitoseg-worker"  # what squeue and sacct show


@pytest.mark.cluster
def test_too_few_workers_is_a_clear_error_naming_the_cluster() -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as running:
        address = AddressClusterConfig(kind="address", address=running.scheduler_address, min_workers=2, wait_s=1)
        message = r"only 1 of 2 Dask worker\(s\) joined within 1 s \(address cluster\)"
        with pytest.raises(ConfigError, match=message), dask_client(address):
            pass


def test_sigterm_in_a_cluster_raises_system_exit_so_that_the_cluster_closes() -> None:
    """A batch system's SIGTERM (scancel, walltime) unwinds the client, running the clusters' exits; after the
    block, SIGTERM is handled as before (here by a recording handler, so a failure cannot end the test run)."""
    received: list[int] = []

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, record)
    try:
        closed = []
        with pytest.raises(SystemExit) as stop, terminate_raises():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            finally:
                closed.append(True)
        assert stop.value.code == 143 and closed == [True] and not received
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_kubernetes_cluster_is_made_by_the_operator_and_closed_after_the_run(monkeypatch) -> None:
    """No Kubernetes here: the operator's KubeCluster is replaced by one that runs its workers in-process, and
    records what mitoseg asked it for."""
    import dask_kubernetes.operator
    from distributed import LocalCluster

    from pipeline.cluster import dask_client
    from pipeline.config.cluster import KubernetesClusterConfig

    made: list[Any] = []

    class FakeKubeCluster(LocalCluster):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(n_workers=kwargs["n_workers"], processes=False, dashboard_address=None)
            self.asked, self.adapted = kwargs, None
            made.append(self)

        def adapt(self, minimum: int | None = None, maximum: int | None = None, **_: Any) -> None:
            self.adapted = (minimum, maximum)

    monkeypatch.setattr(dask_kubernetes.operator, "KubeCluster", FakeKubeCluster)
    config = KubernetesClusterConfig(
        kind="kubernetes", image="registry.example.org/mitoseg:0.1.0", min_workers=1, max_workers=8, gpus_per_worker=1
    )
    with dask_client(config) as client:
        assert client.submit(lambda: 41 + 1).result() == 42
    kube = made[0]
    assert kube.adapted == (1, 8) and kube.status.name == "closed"  # the pods go with the run
    assert kube.asked["image"] == "registry.example.org/mitoseg:0.1.0" and kube.asked["shutdown_on_close"] is True
    assert kube.asked["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert kube.asked["env"]["MITOSEG_TORCH_THREADS"] == "4" and kube.asked["env"]["MALLOC_MMAP_MAX_"] == "0"
    with pytest.raises(ValueError, match="min_workers 3 is more than max_workers 2"):
        KubernetesClusterConfig(kind="kubernetes", image="x:1", min_workers=3, max_workers=2)
