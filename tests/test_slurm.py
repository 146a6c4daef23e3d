"""mitoseg on a real SLURM cluster (one node, .ci/slurm-up, with accounting): workers as dask-jobqueue jobs, worker
jobs cancelled or reaching their walltime mid-run, the sbatch scripts and their exit status, DDP training.

Every run's output is compared bit for bit with a LocalCluster run of the same job. Bit-identity needs the same
torch thread count everywhere: two local workers share the cores, and each worker job has as many.
"""

from __future__ import annotations

import copy
import datetime
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml
from conftest import em_like, write_raw

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
SHAPE = [32, 192, 192]  # the demo volume, thinner: 4 blocks of the demo's plan
BLOCKS = 4  # in the demo job and in tiny_job
WORKER_JOB = "mitoseg-worker"
UNFINISHED = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED")
THREADS = max(1, (os.cpu_count() or 1) // 2)  # torch threads of each of two local workers, and of each worker job

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.usefixtures("slurm")]


def demo_job(data: Path, out: Path, cluster: dict[str, Any]) -> dict:
    """configs/demo.yaml (OME-Zarr and precomputed probabilities, instances) on the volume in `data`, writing
    under `out`."""
    job = copy.deepcopy(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()))
    job.pop("workers")
    job["input"] = f"{data}/em.zarr/raw"
    job["synthetic"].update({"shape": SHAPE, "truth": f"{data}/em.zarr/label"})
    job["output"] = [f"{out}/prediction.zarr/probs", f"precomputed://{out}/prediction_precomputed"]
    job["instances"] = {"output": f"{out}/instances.zarr/mitochondria", "table": f"{out}/mitochondria.csv"}
    return {**job, "cluster": cluster}


def tiny_job(raw: str, out: Path, checkpoint: Path, cluster: dict[str, Any]) -> dict:
    """A job of 4 blocks with the tiny network (conftest.tiny_checkpoint): cheap blocks, for the runs whose length
    comes from tests/worker_faults_preload.py."""
    return {
        "input": raw, "output": [f"{out}/out.zarr/probs"], "checkpoint": str(checkpoint),
        "block_size": [16, 32, 32], "chunk_size": [16, 32, 32], "cluster": cluster,
    }  # fmt: skip


def slurm_cluster(logs: Path, **fields: Any) -> dict[str, Any]:
    """A small `cluster: slurm` section: 3 GiB worker jobs with THREADS cores, their logs under `logs`."""
    return {
        "kind": "slurm", "max_jobs": 2, "min_workers": 2, "cores": THREADS, "memory": "3GiB", "walltime": "00:10:00",
        "wait_s": 180, "log_directory": str(logs), **fields,
    }  # fmt: skip


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job))
    return path


def mitoseg(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def worker_faults(
    *, delay_s: float | None = None, fail_writes_at: str | None = None, faults: Path | None = None
) -> dict[str, str]:
    """This environment, with workers that wait `delay_s` before each block or whose writes of the block at
    offset `fail_writes_at` (Z,Y,X) fail, marking it under `faults` (tests/worker_faults_preload.py). A delay makes
    a run last long enough for worker jobs to end mid-run, without costing more CPU."""
    env = {
        **os.environ,
        "DASK_DISTRIBUTED__WORKER__PRELOAD": f'["{Path(__file__).with_name("worker_faults_preload.py")}"]',
    }
    if delay_s is not None:
        env["MITOSEG_TEST_BLOCK_DELAY_S"] = str(delay_s)
    if fail_writes_at is not None:
        env.update({"MITOSEG_TEST_FAIL_WRITES": fail_writes_at, "MITOSEG_TEST_FAULT_DIR": str(faults)})
    return env


def voxels(url: str) -> np.ndarray:
    from pipeline.volumes import open_volume

    volume = open_volume(url)
    return volume.read(volume.meta.roi)


def assert_same_outputs(job: dict, reference: dict) -> None:
    """`job`'s outputs (its instances too, when it decodes them) equal the reference run's, voxel for voxel."""
    pairs = list(zip(job["output"], reference["output"], strict=False))
    if job.get("instances"):
        pairs.append((job["instances"]["output"], reference["instances"]["output"]))
    for url, ref in pairs:
        np.testing.assert_array_equal(voxels(url), voxels(ref), err_msg=f"{url} differs from the LocalCluster run")


def now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")


def sacct(*args: str) -> list[dict[str, str]]:
    """Accounting records (job allocations only) as dicts of JobID, JobName, State, ExitCode, Elapsed."""
    fields = ["JobID", "JobName", "State", "ExitCode", "Elapsed"]
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", ",".join(fields), *args], capture_output=True, text=True, check=True
    ).stdout
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line]


def worker_jobs(since: str) -> list[dict[str, str]]:
    """The worker jobs submitted since `since`, once accounting has recorded how each ended."""
    return poll(
        lambda: (
            (jobs := sacct("-S", since, "--name", WORKER_JOB))
            and all(j["State"] not in UNFINISHED for j in jobs)
            and jobs
        ),
        "the worker jobs to end in accounting",
    )


def squeue(*args: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i", *args], capture_output=True, text=True, check=True).stdout
    return out.split()


def poll(condition: Callable[[], Any], what: str, seconds: float = 120) -> Any:
    """`condition()`'s first truthy value, checked twice a second; a test failure naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")


def in_jobs(job_ids: set[str]) -> list[str]:
    """Processes still running inside the SLURM jobs `job_ids` (their environment names the job)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.environ().get("SLURM_JOB_ID") in job_ids:
                found.append(f"{process.pid}: {' '.join(process.info['cmdline'] or [])}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def assert_nothing_left(jobs: list[dict[str, str]]) -> None:
    """No worker job queued or running, and no process of any worker job alive (dask workers, nannies)."""
    poll(lambda: not squeue("-n", WORKER_JOB), "the worker jobs to leave the queue", 30)
    ids = {j["JobID"] for j in jobs}
    deadline = time.monotonic() + 30
    while (left := in_jobs(ids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the worker jobs outlived the run: {left}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The demo volume and the reference: the demo job on a LocalCluster."""
    root = tmp_path_factory.mktemp("slurm-demo")
    job = demo_job(root / "data", root / "local", local_cluster())
    run = mitoseg("segment", str(write_job(root / "local.yaml", job)), cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root / "data", job


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> tuple[str, dict]:
    """An EM-like volume and the reference: tiny_job on a LocalCluster."""
    root = tmp_path_factory.mktemp("slurm-tiny")
    raw = write_raw(str(root / "em.zarr" / "raw"), em_like((16, 64, 64)))
    job = tiny_job(raw, root / "local", tiny_checkpoint, local_cluster())
    run = mitoseg("segment", str(write_job(root / "local.yaml", job)), cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return raw, job


def local_cluster() -> dict[str, Any]:
    """Two local workers, THREADS torch threads each, like the worker jobs."""
    return {"kind": "local", "workers": 2}


def test_demo_job_on_slurm_equals_local_cluster_and_sacct_lists_its_workers(
    tmp_path: Path, demo: tuple[Path, dict]
) -> None:
    data, reference = demo
    job = demo_job(data, tmp_path, slurm_cluster(tmp_path / "logs"))
    since = now()
    run = mitoseg("segment", str(write_job(tmp_path / "job.yaml", job)), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"segment: {BLOCKS} block(s) computed, 0 skipped (already done), 0 failed" in run.stdout
    assert_same_outputs(job, reference)
    jobs = worker_jobs(since)
    assert len(jobs) >= 2, jobs  # min_workers 2, one worker per job
    assert_nothing_left(jobs)


def done_blocks(output: str) -> int:
    """Blocks recorded as done in the output's run state so far."""
    from pipeline.resume import BlockRecords

    return sum(len(BlockRecords(str(d), "").load()) for d in Path(f"{output}.mitoseg").glob("segment/*"))


def test_a_worker_job_cancelled_mid_run_loses_nothing(
    tmp_path: Path, tiny: tuple[str, dict], tiny_checkpoint: Path
) -> None:
    """Two worker jobs, blocks of 8 s; one job is cancelled once a block is done: Dask moves its block to the other
    worker, the cluster submits a replacement, and the output is the LocalCluster's."""
    raw, reference = tiny
    job = tiny_job(raw, tmp_path, tiny_checkpoint, slurm_cluster(tmp_path / "logs"))
    since = now()
    log = (tmp_path / "run.log").open("w")
    cmd = [sys.executable, "-m", "pipeline", "segment", str(write_job(tmp_path / "job.yaml", job))]
    run = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=worker_faults(delay_s=8)
    )
    try:
        running = poll(
            lambda: done_blocks(job["output"][0]) >= 1 and squeue("-n", WORKER_JOB, "-t", "R"),
            "a first block done while worker jobs run",
            300,
        )
        subprocess.run(["scancel", running[0]], check=True)
        done_at_cancel = done_blocks(job["output"][0])
        status = run.wait(timeout=300)
    finally:
        run.kill()
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert status == 0, output[-3000:]
    assert done_at_cancel < BLOCKS, "the run had finished before the job was cancelled: nothing was tested"
    assert "0 failed" in output
    assert_same_outputs(job, reference)
    jobs = worker_jobs(since)
    assert next(j for j in jobs if j["JobID"] == running[0])["State"].startswith("CANCELLED"), jobs
    assert_nothing_left(jobs)


def test_worker_jobs_reaching_their_walltime_mid_run_lose_nothing(
    tmp_path: Path, tiny: tuple[str, dict], tiny_checkpoint: Path
) -> None:
    """One-minute worker jobs, one at a time, on a run of more than a minute (4 blocks of 15 s; a worker retires
    44-52 s after it starts): each job ends before or at its walltime with blocks left, and the adaptive cluster
    submits the next one."""
    raw, reference = tiny
    cluster = slurm_cluster(tmp_path / "logs", max_jobs=1, min_workers=1, walltime="00:01:00")
    job = tiny_job(raw, tmp_path, tiny_checkpoint, cluster)
    since = now()
    run = mitoseg("segment", str(write_job(tmp_path / "job.yaml", job)), cwd=tmp_path, env=worker_faults(delay_s=15))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{BLOCKS} block(s) computed, 0 skipped (already done), 0 failed" in run.stdout
    assert_same_outputs(job, reference)
    jobs = worker_jobs(since)
    assert len(jobs) >= 2, f"one job did all the work before its walltime: nothing was tested ({jobs})"
    assert_nothing_left(jobs)


def sbatch(
    script: str, *args: str, cwd: Path, env: dict[str, str], options: tuple[str, ...] = (), wait: bool = False
) -> tuple[str, int]:
    """Submit deploy/slurm/`script` and wait for it to end: the job's id and its exit status, as `sbatch --wait`
    reports it (`wait`) or as accounting records it (polled twice a second: `--wait` polls ever more slowly)."""
    command = ["sbatch", "--parsable", "-o", str(cwd / "slurm-%j.out"), *options]
    script_args = [str(ROOT / "deploy" / "slurm" / script), *args]
    proc = subprocess.run(
        [*command, *(["--wait"] if wait else []), *script_args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=600,
    )  # fmt: skip
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id, proc.stderr
    if wait:
        return job_id, proc.returncode
    ended = poll(
        lambda: not squeue("-j", job_id) and [j for j in sacct("-j", job_id) if j["State"] not in UNFINISHED],
        f"job {job_id} to end",
        600,
    )
    return job_id, int(ended[0]["ExitCode"].split(":")[0])


def without_venv() -> dict[str, str]:
    """This environment with the virtual environment off PATH: the job has to activate it (MITOSEG_ENV)."""
    path = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != VENV / "bin"]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return {**env, "PATH": os.pathsep.join(path)}


def test_segment_sbatch_exit_status_is_mitosegs(tmp_path: Path, tiny: tuple[str, dict], tiny_checkpoint: Path) -> None:
    """A good job ends COMPLETED 0 with its workers as further SLURM jobs; a job with a block that keeps failing
    (workers inside the job) ends FAILED 1; a bad job file ends FAILED 2."""
    raw, _ = tiny
    cluster = slurm_cluster(tmp_path / "logs", max_jobs=1, min_workers=1, memory="2GiB")
    good = tiny_job(raw, tmp_path, tiny_checkpoint, cluster)
    env = {**without_venv(), "MITOSEG_ENV": str(VENV)}
    small = ("--cpus-per-task=1", "--mem=1G", "--time=00:10:00")
    since = now()
    job_id, status = sbatch("segment.sbatch", str(write_job(tmp_path / "good.yaml", good)), cwd=tmp_path, env=env,
                            options=small)  # fmt: skip
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert status == 0, log[-3000:]
    assert "4 block(s) computed, 0 skipped (already done), 0 failed" in log
    assert voxels(good["output"][0]).any()
    assert [(j["State"], j["ExitCode"]) for j in sacct("-j", job_id)] == [("COMPLETED", "0:0")]
    assert worker_jobs(since)  # the job file's cluster section ran the workers as jobs of their own

    failing = {**good, "output": [f"{tmp_path}/failing.zarr/probs"], "cluster": {"kind": "local", "workers": 1}}
    failing_env = {**worker_faults(fail_writes_at="0,0,0", faults=tmp_path / "faults"), "MITOSEG_ENV": str(VENV)}
    job_id, status = sbatch("segment.sbatch", str(write_job(tmp_path / "failing.yaml", failing)), cwd=tmp_path,
                            env=failing_env, options=small)  # fmt: skip
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert status == 1, log[-3000:]
    assert "3 block(s) computed, 0 skipped (already done), 1 failed" in log
    assert [(j["State"], j["ExitCode"]) for j in sacct("-j", job_id)] == [("FAILED", "1:0")]

    bad = write_job(tmp_path / "bad.yaml", {**good, "blok_size": [16, 32, 32]})
    job_id, status = sbatch("segment.sbatch", str(bad), cwd=tmp_path, env=env, options=small, wait=True)
    assert status == 2
    assert "blok_size" in (tmp_path / f"slurm-{job_id}.out").read_text()
    assert [(j["State"], j["ExitCode"]) for j in sacct("-j", job_id)] == [("FAILED", "2:0")]


def test_segment_sbatch_stopped_by_sigterm_cancels_its_worker_jobs(
    tmp_path: Path, tiny: tuple[str, dict], tiny_checkpoint: Path
) -> None:
    """SIGTERM to the batch shell, as `--signal=B:TERM@120` sends it before the walltime: mitoseg closes its
    cluster, so SLURM cancels the worker jobs (rather than their workers finding the scheduler gone)."""
    raw, _ = tiny
    cluster = slurm_cluster(tmp_path / "logs", max_jobs=1, min_workers=1, memory="2GiB")
    job = tiny_job(raw, tmp_path, tiny_checkpoint, cluster)
    env = {**worker_faults(delay_s=60), "MITOSEG_ENV": str(VENV)}
    since = now()
    submitted = subprocess.run(
        ["sbatch", "--parsable", "-o", str(tmp_path / "slurm-%j.out"), "--cpus-per-task=1", "--mem=1G",
         str(ROOT / "deploy" / "slurm" / "segment.sbatch"), str(write_job(tmp_path / "job.yaml", job))],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    client = submitted.stdout.strip().split(";")[0]
    poll(lambda: squeue("-n", WORKER_JOB, "-t", "R"), "the client's worker job to run", 300)
    subprocess.run(["scancel", "--batch", "--signal=TERM", client], check=True)
    ended = poll(
        lambda: not squeue("-j", client) and [j for j in sacct("-j", client) if j["State"] not in UNFINISHED],
        "the client job to end",
        300,
    )
    # mitoseg exits 143 (128 + SIGTERM), which SLURM 22.05 records as ExitCode 15:0
    assert ended[0]["State"] == "FAILED" and ended[0]["ExitCode"] in ("15:0", "143:0"), ended
    assert "SIGTERM: closing the Dask cluster" in (tmp_path / f"slurm-{client}.out").read_text()
    workers = worker_jobs(since)
    assert workers and all(j["State"].startswith("CANCELLED") for j in workers), workers
    assert_nothing_left(workers)


RANK_WEIGHTS = textwrap.dedent(
    """\
    #!{python}
    # `mitoseg`, also saving each rank's final weights: rank 1 writes no checkpoint, so this is the test's view of it.
    import os

    import torch

    import pipeline.training.loop as loop
    from pipeline.cli import main

    train = loop.train


    def recorded(cfg, **options):
        result = train(cfg, **options)
        torch.save(result.network.state_dict(), os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
        return result


    loop.train = recorded
    main()
    """
)


def test_train_sbatch_runs_two_ranks_with_identical_weights_and_resumes(tmp_path: Path) -> None:
    import torch

    volume = {
        "raw": str(tmp_path / "syn.zarr/raw"), "label": str(tmp_path / "syn.zarr/label"),
        "synthetic": {"shape": [16, 64, 64], "seed": 0}, "train": {"z": [0, 12]}, "validation": {"z": [12, 16]},
    }  # fmt: skip
    config = {
        "output_dir": str(tmp_path / "run"), "device": "cpu", "num_threads": 1,
        "data": {"volumes": [volume], "patch_shape": [8, 32, 32]},
        "network": {"widths": [4, 8], "embedding_dim": 8, "context": [1, 4, 4]},
        "loss": {"contrastive_warmup": 2, "sampling": {"num_points": 64}},
        "optim": {"lr": 0.01, "warmup_iterations": 1, "iterations": 4, "ema_decay": 0.5},
        "checkpoint_every": 2, "val_every": 100, "val_patch_shape": [8, 32, 32],
    }  # fmt: skip
    job = write_job(tmp_path / "train.yaml", config)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mitoseg").write_text(RANK_WEIGHTS.format(python=sys.executable, out=str(tmp_path)))
    (bin_dir / "mitoseg").chmod(0o755)
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), str(VENV / "bin"), os.environ["PATH"]])}
    options = ("--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=3G", "--time=00:10:00")

    for args, step in (((str(job), "--max-iterations", "2"), 2), ((str(job), "--resume"), 4)):
        job_id, status = sbatch("train.sbatch", *args, cwd=tmp_path, env=env, options=options)
        assert status == 0, (tmp_path / f"slurm-{job_id}.out").read_text()[-3000:]
        last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
        assert last["step"] == step and last["metadata"].count('"world_size": 2') == 1
        rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
        rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
        for key, value in rank0.items():
            torch.testing.assert_close(rank1[key], value, rtol=0, atol=0, msg=f"after step {step}: {key}")
    assert [j["State"] for j in sacct("-j", job_id)] == ["COMPLETED"]
