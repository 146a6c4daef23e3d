"""Connecting to Dask: a LocalCluster by default, batch jobs (SLURM, PBS, LSF), or an existing scheduler."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import dask

from pipeline.config.cluster import (
    AddressClusterConfig,
    BatchClusterConfig,
    ClusterConfig,
    KubernetesClusterConfig,
    LocalClusterConfig,
    SchedulerFileClusterConfig,
)
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def worker_environment(threads: int) -> dict[str, str]:
    """Variables a worker process needs from its start: thread pools and glibc malloc read them only once.

    They go in Dask's `distributed.nanny.pre-spawn-environ` (a LocalCluster's `env=` is applied after the
    worker has started, too late for malloc). Tuned malloc reuses freed activation buffers instead of
    unmapping and faulting them in again every forward pass (up to 1.2x faster on CPU; benchmarks/throughput.py).
    """
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "MALLOC_MMAP_MAX_": "0",
            "MALLOC_TRIM_THRESHOLD_": str(2**36),
        }
    )
    return environ


@contextmanager
def dask_client(cluster: ClusterConfig | None = None, gpus: int = 0) -> Iterator[Any]:
    """A Dask client on the cluster `cluster` describes (a LocalCluster of one worker by default).

    Waits for the cluster's `min_workers` (batch jobs may queue) and closes what it started on exit. Local
    workers run one thread each (cloud-volume and torch do better in processes than in threads) and each gets its
    share of the machine's cores for torch; with `gpus` they advertise a `GPU` resource. Every worker, also one
    that joins later, gets this process's S3 endpoint (workers.storage_plugin).
    """
    from workers.storage_plugin import share_storage

    cluster = cluster or LocalClusterConfig()
    with terminate_raises():
        if isinstance(cluster, LocalClusterConfig):
            with _local_client(cluster, gpus) as client:
                share_storage(client)
                yield client
        elif isinstance(cluster, BatchClusterConfig):
            with _batch_client(cluster) as client:
                share_storage(client)
                yield client
        elif isinstance(cluster, KubernetesClusterConfig):
            with _kubernetes_client(cluster) as client:
                share_storage(client)
                yield client
        else:
            with _existing_client(cluster) as client:
                share_storage(client)
                yield client


@contextmanager
def terminate_raises() -> Iterator[None]:
    """While the body runs, SIGTERM raises SystemExit(143) instead of ending the process at once.

    A batch system sends SIGTERM when it cancels the client's job or its walltime nears (deploy/slurm/
    segment.sbatch); raising lets the clusters' exits run, so worker jobs are cancelled rather than left queued
    or idle until their own walltime. A second SIGTERM acts as before. Only the main thread can set handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # a handler not set from Python: put the default back
        previous = signal.SIG_DFL

    def _raise(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, previous)
        log.warning("SIGTERM: closing the Dask cluster and stopping")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_workers(client: Any, cluster: ClusterConfig) -> None:
    """Block until the cluster's `min_workers` have joined; a clear error after `wait_s`."""
    try:
        client.wait_for_workers(cluster.min_workers, timeout=cluster.wait_s)
    except TimeoutError as err:
        present = client.scheduler_info(n_workers=0)["n_workers"]
        raise ConfigError(
            f"only {present} of {cluster.min_workers} Dask worker(s) joined within {cluster.wait_s:.0f} s "
            f"({cluster.kind} cluster): check that worker jobs start (squeue, the workers' logs), or lower "
            "cluster.min_workers, or raise cluster.wait_s"
        ) from err


@contextmanager
def _existing_client(cluster: AddressClusterConfig | SchedulerFileClusterConfig) -> Iterator[Any]:
    from distributed import Client

    where = cluster.address if isinstance(cluster, AddressClusterConfig) else cluster.scheduler_file
    try:
        if isinstance(cluster, AddressClusterConfig):
            client = Client(cluster.address, timeout="30s")
        else:
            client = Client(scheduler_file=cluster.scheduler_file, timeout="30s")
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot reach the Dask scheduler at {where!r}: {err}; check the address or scheduler file, and that "
            "the scheduler runs"
        ) from err
    try:
        wait_for_workers(client, cluster)
        yield client
    finally:
        client.close()


@contextmanager
def _local_client(cluster: LocalClusterConfig, gpus: int) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    workers = cluster.workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    kwargs: dict[str, Any] = {}
    if gpus:
        kwargs["resources"] = {"GPU": 1}
    environ = worker_environment(threads)
    # The nanny writes pre-spawn variables into this process's os.environ whenever it (re)starts a worker;
    # put them back when the cluster is gone, so that the caller's later subprocesses do not inherit them.
    with restored_environ(environ):
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            local = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                memory_limit=cluster.memory_limit or "auto",
                env={"MITOSEG_TORCH_THREADS": str(threads)},
                **kwargs,
            )
        client = Client(local)
        log.info("started a LocalCluster with %d worker(s), %d torch thread(s) each", workers, threads)
        try:
            yield client
        finally:
            client.close()
            local.close()


def walltime_seconds(walltime: str) -> int:
    """Seconds of a batch walltime written [D-]HH:MM[:SS]."""
    days, _, clock = walltime.rpartition("-")
    parts = [int(p) for p in clock.split(":")] + [0]
    hours, minutes, seconds = parts[:3]
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def batch_job_options(cluster: BatchClusterConfig) -> dict[str, Any]:
    """The dask-jobqueue arguments of a batch cluster: resources, prologue, and workers that retire in time.

    Each worker retires `lifetime_margin_s` before its job's walltime, so the batch system never kills it in the
    middle of a block: its blocks move to other workers and the adaptive cluster submits a new job.
    """
    threads = max(1, cluster.cores // cluster.processes)
    walltime = walltime_seconds(cluster.walltime)
    lifetime = max(30, walltime - min(cluster.lifetime_margin_s, walltime // 5))  # short test jobs keep 80 %
    exports = {**worker_environment(threads), "MITOSEG_TORCH_THREADS": str(threads)}
    worker_args = ["--lifetime", f"{lifetime}s", "--lifetime-stagger", f"{max(1, min(60, lifetime // 10))}s"]
    directives = list(cluster.job_extra_directives)
    if cluster.gpus_per_job:
        worker_args += ["--resources", "GPU=1"]
        if cluster.kind == "slurm":
            directives.append(f"--gres=gpu:{cluster.gpus_per_job}")
    options: dict[str, Any] = {
        "cores": cluster.cores,
        "processes": cluster.processes,
        "memory": cluster.memory,
        "walltime": cluster.walltime,
        "queue": cluster.queue,
        "account": cluster.account,
        "job_script_prologue": [*cluster.job_script_prologue, *(f"export {k}={v}" for k, v in exports.items())],
        "job_extra_directives": directives,
        "worker_extra_args": worker_args,
        "python": cluster.python or sys.executable,
        "interface": cluster.interface,
        "log_directory": cluster.log_directory,
        "name": "mitoseg",
        "job_name": "mitoseg-worker",  # what squeue and sacct show
    }
    return {key: value for key, value in options.items() if value is not None}


@contextmanager
def _batch_client(cluster: BatchClusterConfig) -> Iterator[Any]:
    try:
        import dask_jobqueue
    except ImportError as err:
        raise ConfigError(f"cluster kind {cluster.kind!r} needs dask-jobqueue: pip install 'mitoseg[hpc]'") from err
    classes = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster"}
    batch = getattr(dask_jobqueue, classes[cluster.kind])(**batch_job_options(cluster))
    minimum = max(cluster.min_jobs, -(-cluster.min_workers // cluster.processes))
    with _adaptive_client(
        batch, cluster, minimum_jobs=min(minimum, cluster.max_jobs), maximum_jobs=cluster.max_jobs
    ) as client:
        log.info(
            "%s cluster: %d to %d job(s) of %d worker(s)", cluster.kind, minimum, cluster.max_jobs, cluster.processes
        )
        yield client


@contextmanager
def _adaptive_client(started: Any, cluster: ClusterConfig, **adapt: int) -> Iterator[Any]:
    """Make the cluster `started` adaptive and yield a client on it once `min_workers` joined; close both at the
    end, the cluster also when anything before failed."""
    from distributed import Client

    try:
        started.adapt(**adapt)
        client = Client(started)
        try:
            wait_for_workers(client, cluster)
            yield client
        finally:
            client.close()
    finally:
        started.close()


def kubernetes_options(cluster: KubernetesClusterConfig) -> dict[str, Any]:
    """The dask-kubernetes `KubeCluster` arguments of a Kubernetes cluster: pods with fixed resources and mitoseg's
    thread and malloc settings, removed when the run closes the cluster."""
    threads = max(1, int(float(cluster.cpu.removesuffix("m")) / (1000 if cluster.cpu.endswith("m") else 1)))
    limits = {"cpu": cluster.cpu, "memory": cluster.memory}
    if cluster.gpus_per_worker:
        limits["nvidia.com/gpu"] = str(cluster.gpus_per_worker)
    options: dict[str, Any] = {
        "name": cluster.name,
        "namespace": cluster.namespace,
        "image": cluster.image,
        "n_workers": cluster.min_workers,
        "resources": {"requests": dict(limits), "limits": limits},
        "env": {**worker_environment(threads), "MITOSEG_TORCH_THREADS": str(threads)},
        "shutdown_on_close": True,
    }
    return {key: value for key, value in options.items() if value is not None}


@contextmanager
def _kubernetes_client(cluster: KubernetesClusterConfig) -> Iterator[Any]:
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as err:
        raise ConfigError("cluster kind 'kubernetes' needs dask-kubernetes: pip install 'mitoseg[k8s]'") from err
    kube = KubeCluster(**kubernetes_options(cluster))
    with _adaptive_client(kube, cluster, minimum=cluster.min_workers, maximum=cluster.max_workers) as client:
        log.info(
            "kubernetes cluster %s: %d to %d worker pod(s)", cluster.name, cluster.min_workers, cluster.max_workers
        )
        yield client


@contextmanager
def restored_environ(names: Iterable[str]) -> Iterator[None]:
    """On exit, give the environment variables `names` back the values (or absence) they had on entry."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
