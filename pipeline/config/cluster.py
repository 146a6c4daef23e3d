"""Where a job's Dask workers run (pydantic models only): this machine, a batch system, or a running scheduler.

Kubernetes jobs use `address`: the dask-kubernetes operator's DaskJob starts the scheduler and workers and hands
the client its address (deploy/kubernetes/segment.yaml).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config.storage import StorageConfig


class _Cluster(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_workers: int = Field(1, ge=1, description="Workers to wait for before the first block is submitted.")
    wait_s: float = Field(600.0, gt=0, description="Seconds to wait for min_workers before giving up with an error.")


class LocalClusterConfig(_Cluster):
    """Worker processes on this machine (the default)."""

    kind: Literal["local"] = "local"
    workers: int = Field(1, ge=1, description="Worker processes, one thread each; cores are shared among them.")
    memory_limit: str | None = Field(None, description="Memory per worker, e.g. 8GiB; None = an equal share.")


class BatchClusterConfig(_Cluster):
    """Workers as batch jobs of SLURM, PBS or LSF (dask-jobqueue), added and removed as the work needs them."""

    kind: Literal["slurm", "pbs", "lsf"]
    queue: str | None = Field(None, description="Partition (SLURM) or queue (PBS, LSF); None = the site default.")
    account: str | None = Field(None, description="Account or project charged for the jobs.")
    walltime: str = Field("01:00:00", pattern=r"^(\d+-)?\d{1,2}:\d{2}(:\d{2})?$", description="Per job, HH:MM:SS.")
    cores: int = Field(1, ge=1, description="Cores per job.")
    memory: str = Field("16GiB", description="Memory per job, e.g. 16GiB.")
    gpus_per_job: int = Field(0, ge=0, description="GPUs per job (SLURM --gres=gpu:N); each worker gets one.")
    processes: int = Field(1, ge=1, description="Worker processes per job (set to gpus_per_job on GPU nodes).")
    min_jobs: int = Field(0, ge=0, description="Jobs kept while the run lasts.")
    max_jobs: int = Field(1, ge=1, description="Jobs at most; the cluster adapts between min_jobs and max_jobs.")
    lifetime_margin_s: int = Field(
        300, ge=0, description="Workers retire this many seconds before the walltime; their blocks move elsewhere."
    )
    job_script_prologue: list[str] = Field(
        default_factory=list, description="Shell lines run before the worker, e.g. module loads, venv activation."
    )
    job_extra_directives: list[str] = Field(default_factory=list, description="Extra #SBATCH/#PBS/#BSUB lines.")
    python: str | None = Field(None, description="The workers' Python; None = the one running mitoseg.")
    interface: str | None = Field(None, description="Network interface of the scheduler and workers, e.g. ib0.")
    log_directory: str | None = Field(None, description="Where the batch system writes the workers' logs.")

    @model_validator(mode="after")
    def _fits(self) -> BatchClusterConfig:
        if self.min_jobs > self.max_jobs:
            raise ValueError(f"min_jobs {self.min_jobs} is more than max_jobs {self.max_jobs}")
        if self.min_workers > self.max_jobs * self.processes:
            raise ValueError(
                f"min_workers {self.min_workers} cannot join: max_jobs x processes is {self.max_jobs * self.processes}"
            )
        if self.gpus_per_job > 1:
            raise ValueError("one GPU per job (each job runs one GPU worker): raise max_jobs for more GPUs")
        return self


class KubernetesClusterConfig(_Cluster):
    """Workers as pods of a Dask cluster the dask-kubernetes operator creates for the run and removes after it.

    For a job that itself runs in the cluster with credentials to create `DaskCluster` resources; the nightly
    `DaskJob` of deploy/kubernetes/ instead hands its client a ready scheduler (`kind: address`)."""

    kind: Literal["kubernetes"]
    image: str = Field(description="Worker image, pinned (e.g. registry.example.org/mitoseg:0.1.0).")
    namespace: str | None = Field(None, description="Namespace of the DaskCluster; None = the current one.")
    name: str = Field("mitoseg", description="Name of the DaskCluster resource.")
    max_workers: int = Field(1, ge=1, description="Workers at most; the cluster adapts between min_workers and this.")
    cpu: str = Field("4", description="CPU request and limit of a worker pod, e.g. 4 or 3500m.")
    memory: str = Field("16Gi", description="Memory request and limit of a worker pod, e.g. 16Gi.")
    gpus_per_worker: int = Field(0, ge=0, le=1, description="GPUs of a worker pod (nvidia.com/gpu): 0 or 1.")

    @model_validator(mode="after")
    def _fits(self) -> KubernetesClusterConfig:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers {self.min_workers} is more than max_workers {self.max_workers}")
        return self


class AddressClusterConfig(_Cluster):
    """A scheduler that is already running (started by hand, by a batch script or by Kubernetes)."""

    kind: Literal["address"]
    address: str = Field(description="Scheduler address, e.g. tcp://host:8786.")


class SchedulerFileClusterConfig(_Cluster):
    """A scheduler that is already running and wrote its address to a file (`dask scheduler --scheduler-file`)."""

    kind: Literal["scheduler_file"]
    scheduler_file: str = Field(description="Path of the scheduler's JSON file on a filesystem shared with it.")


ClusterConfig = Annotated[
    LocalClusterConfig
    | BatchClusterConfig
    | KubernetesClusterConfig
    | AddressClusterConfig
    | SchedulerFileClusterConfig,
    Field(discriminator="kind"),
]


class ClusterJob(BaseModel):
    """A job that runs on a Dask cluster: the `cluster` section, and the short forms `workers` and `scheduler`."""

    model_config = ConfigDict(extra="forbid")

    cluster: ClusterConfig = Field(
        default_factory=LocalClusterConfig,
        description="Where the Dask workers run (kind: local, slurm, pbs, lsf, kubernetes, address, scheduler_file). "
        "`workers: N` is short for a local cluster of N workers, `scheduler: ADDRESS` for an address cluster.",
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="How object storage is reached (the S3 endpoint; no credentials)."
    )

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not {"workers", "scheduler"} & data.keys():
            return data
        data = dict(data)
        workers, scheduler = data.pop("workers", None), data.pop("scheduler", None)
        cluster = dict(data.get("cluster") or {})
        if workers is not None and scheduler is not None:
            raise ValueError("workers (a local cluster) and scheduler (a running one) exclude each other: give one")
        if scheduler is not None:
            kept = {k: cluster[k] for k in ("min_workers", "wait_s") if k in cluster}
            cluster = {"kind": "address", "address": scheduler, **kept}
        elif workers is not None:
            if cluster.get("kind", "local") != "local":
                raise ValueError(
                    f"workers sets the processes of a local cluster, but cluster.kind is {cluster['kind']!r}: "
                    "size a batch cluster with cluster.max_jobs"
                )
            cluster.update(kind="local", workers=workers)
        data["cluster"] = cluster
        return data
