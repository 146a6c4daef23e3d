"""The fault suite: workers killed mid-block, the whole run killed and restarted, storage that fails.

Every case runs on real worker processes and asserts that the final output equals an uninterrupted run's, bit
for bit, and that the result reports what happened (exit status through the CLI where the CLI is the thing run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import em_like, write_raw

from pipeline.config.segment import SegmentConfig
from pipeline.faults import FailWrites, KillWorkerAtBlock
from pipeline.segment import segment
from pipeline.volumes import open_volume

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
SHAPE = (32, 64, 96)
BLOCK = (16, 32, 32)  # 2 x 2 x 3 = 12 blocks
STRUCK = [(0, 32, 32), (16, 0, 64)]


@pytest.fixture(scope="module")
def processes():
    """Two worker processes (a nanny restarts a killed one), shared by the module's tests. A nanny writes Dask's
    worker variables (MALLOC_TRIM_THRESHOLD_, ...) into this process's environment, where they would override
    mitoseg's settings for later clusters: the environment is put back afterwards."""
    from distributed import Client, LocalCluster

    saved = dict(os.environ)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster) as client:
        yield client
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def raw_url(tmp_path_factory) -> str:
    return write_raw(f"zarr://file://{tmp_path_factory.mktemp('raw')}/em.zarr/raw", em_like(SHAPE, seed=3))


def job(raw_url: str, out: str, ckpt: Path | str, **kw) -> SegmentConfig:
    base = dict(input=raw_url, output=[out], checkpoint=ckpt, block_size=BLOCK, chunk_size=BLOCK, pyramid=False)
    return SegmentConfig(**{**base, **kw})


def read_all(url: str) -> np.ndarray:
    volume = open_volume(url)
    return volume.read(volume.meta.roi)


@pytest.fixture(scope="module")
def reference(processes, raw_url, tiny_checkpoint, tmp_path_factory) -> np.ndarray:
    out = f"zarr://file://{tmp_path_factory.mktemp('ref')}/p.zarr"
    result = segment(job(raw_url, out, tiny_checkpoint), client=processes, progress=False)
    assert result.run.ok and result.run.completed == 12
    return read_all(out)


def run_with(client, plugin, config: SegmentConfig):
    """Run `config` with the fault `plugin` on every worker, then remove the fault."""
    client.register_plugin(plugin)
    try:
        return segment(config, client=client, progress=False)
    finally:
        client.unregister_worker_plugin(plugin.name)


def test_a_worker_killed_mid_block_loses_nothing(processes, raw_url, tiny_checkpoint, reference, tmp_path):
    out = f"zarr://file://{tmp_path}/p.zarr"
    fault = KillWorkerAtBlock(STRUCK, str(tmp_path / "markers"))
    result = run_with(processes, fault, job(raw_url, out, tiny_checkpoint))
    assert fault.count() == 2  # both workers were killed once, mid-block
    assert result.run.ok and result.run.completed == 12
    assert np.array_equal(read_all(out), reference)
    assert open_volume(out).provenance["complete"] is True


def test_a_block_that_always_kills_its_worker_is_reported_and_the_rest_written(
    processes, raw_url, tiny_checkpoint, reference, tmp_path
):
    out = f"zarr://file://{tmp_path}/p.zarr"
    fault = KillWorkerAtBlock(STRUCK[:1], str(tmp_path / "markers"), always=True)
    result = run_with(processes, fault, job(raw_url, out, tiny_checkpoint))
    failed = [f.write_roi for f in result.run.failures]
    # Dask gives up on a task after its workers died 4 times; tasks queued on the same dying workers may share
    # that fate: each is reported, and every other block is written
    assert "0,32,32:16,32,32" in failed
    assert result.run.completed + len(failed) == 12 and result.run.completed >= 6
    assert open_volume(out).provenance["complete"] is False
    again = segment(job(raw_url, out, tiny_checkpoint), client=processes, progress=False)  # the fault is gone
    assert again.run.ok and again.run.completed == len(failed)  # only the failed blocks are computed
    assert np.array_equal(read_all(out), reference)


def test_transient_write_failures_are_retried(processes, raw_url, tiny_checkpoint, reference, tmp_path):
    out = f"zarr://file://{tmp_path}/p.zarr"
    fault = FailWrites(STRUCK, str(tmp_path / "markers"))
    result = run_with(processes, fault, job(raw_url, out, tiny_checkpoint))
    assert fault.count() == 2
    assert result.run.ok and result.run.completed == 12
    assert np.array_equal(read_all(out), reference)


def test_a_permanently_unwritable_block_is_reported_then_repaired(
    processes, raw_url, tiny_checkpoint, reference, tmp_path
):
    out = f"zarr://file://{tmp_path}/p.zarr"
    fault = FailWrites(STRUCK[1:], str(tmp_path / "markers"), always=True)
    result = run_with(processes, fault, job(raw_url, out, tiny_checkpoint, retries=1))
    assert len(result.run.failures) == 1
    failure = result.run.failures[0]
    assert failure.write_roi == "16,0,64:16,32,32" and "injected storage fault" in failure.error
    assert open_volume(out).provenance["complete"] is False
    again = segment(job(raw_url, out, tiny_checkpoint), client=processes, progress=False)
    assert again.run.ok and again.run.completed == 1
    assert np.array_equal(read_all(out), reference)


def _stored(p: Path) -> bool:
    """Whether `p` is a stored file, not zarr's temporary `<key>.<uuid>.partial` of a write in progress (renamed
    over the key when complete; a writer killed mid-write leaves it behind, and no reader ever sees it)."""
    return p.is_file() and not p.name.endswith(".partial")


def _chunks_written(path: Path) -> int:
    """Data chunks in a zarr output (every stored file that is not metadata)."""
    return sum(1 for p in path.rglob("*") if _stored(p) and not p.name.startswith((".z", "zarr.json")))


def test_the_whole_run_killed_and_restarted_loses_nothing(raw_url, tiny_checkpoint, reference, tmp_path):
    """`mitoseg segment` SIGKILLed (client, scheduler and workers at once) after some blocks, then run again."""
    out_path = tmp_path / "p.zarr"
    config = {
        "input": raw_url,
        "output": f"zarr://file://{out_path}",
        "checkpoint": str(tiny_checkpoint),
        "block_size": list(BLOCK),
        "chunk_size": list(BLOCK),
        "pyramid": False,
        "cluster": {"kind": "local", "workers": 1},
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "pipeline", "segment", str(job_file)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen(command, start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while _chunks_written(out_path) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be killed: " + first.stdout.read().decode()[-2000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    written = _chunks_written(out_path)
    assert 0 < written < 12
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert np.array_equal(read_all(f"zarr://file://{out_path}"), reference)
    assert open_volume(f"zarr://file://{out_path}").provenance["complete"] is True


def _tree(path: Path) -> dict[str, bytes]:
    """Every data file under `path` (chunks of every scale, meshes, segment properties), by relative path: not
    the run state, nor the zarr metadata that holds each run's own provenance (ids, times)."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if _stored(p) and ".mitoseg" not in str(p.relative_to(path)) and p.name != "zarr.json"
    }


@pytest.fixture(scope="module")
def tissue_url(tmp_path_factory) -> str:
    """A synthetic EM volume with mitochondria at the demo network's voxel size, so that every stage has objects."""
    from pipeline.synthetic import generate_volume
    from pipeline.volumes import VolumeMeta, create_volume

    raw, _ = generate_volume(SHAPE, seed=5)
    meta = VolumeMeta(shape=SHAPE, dtype=raw.dtype, chunks=BLOCK, voxel_size_nm=(5.0, 5.0, 5.0))
    url = f"zarr://file://{tmp_path_factory.mktemp('tissue')}/em.zarr/raw"
    create_volume(url, meta).write(meta.roi, raw[None])
    return url


def full_job(raw_url: str, root: Path) -> SegmentConfig:
    """Every stage: probabilities and their pyramid, instances with their pyramid and meshes (the demo network)."""
    from pipeline.config.instances import InstancesConfig

    follow = InstancesConfig(output=f"zarr://file://{root}/labels.zarr")
    return job(raw_url, f"zarr://file://{root}/p.zarr", "demo", pyramid=True, instances=follow)


@pytest.fixture(scope="module")
def full_reference(processes, tissue_url, tmp_path_factory) -> Path:
    """An uninterrupted run of every stage."""
    root = tmp_path_factory.mktemp("full")
    config = full_job(tissue_url, root)
    result = segment(config, client=processes, progress=False)
    assert not result.failures and result.extra["instances"].meshes is not None
    files = _tree(root / "labels.zarr")
    assert any("mesh" in name for name in files) and any(name.startswith("s1/") for name in files)
    return root


@pytest.mark.parametrize(
    "stage",
    [
        "pipeline.viewing.pyramid:DownsampleBlock",
        "pipeline.instances.tasks:RelabelTask",
        "pipeline.viewing.meshes:MeshBlock",
    ],
)
def test_a_worker_killed_in_a_later_stage_loses_nothing(processes, tissue_url, full_reference, tmp_path, stage):
    config = full_job(tissue_url, tmp_path)
    fault = KillWorkerAtBlock([(0, 0, 0)], str(tmp_path / "markers"), target=stage)
    result = run_with(processes, fault, config)
    assert fault.count() == 1 and not result.failures
    for name in ("p.zarr", "labels.zarr"):
        assert _tree(tmp_path / name) == _tree(full_reference / name), f"{name} differs after a kill in {stage}"


def test_the_whole_run_killed_during_instances_relabel_and_restarted_loses_nothing(
    tissue_url, full_reference, tmp_path
):
    """`mitoseg segment` with instances SIGKILLed once relabelling has written labels (relabel blocks are slowed
    so that the kill lands mid-stage), then run again: every stage's files equal an uninterrupted run's."""
    config = full_job(tissue_url, tmp_path).model_dump(mode="json", exclude_unset=True)
    config["cluster"] = {"kind": "local", "workers": 1}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "pipeline", "segment", str(job_file)]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    slow = {
        "DASK_DISTRIBUTED__WORKER__PRELOAD": f'["{Path(__file__).with_name("worker_faults_preload.py")}"]',
        "MITOSEG_TEST_BLOCK_DELAY_S": "0.5",
        "MITOSEG_TEST_DELAY_TARGET": "pipeline.instances.tasks:RelabelTask",
    }
    first = subprocess.Popen(command, start_new_session=True, env={**env, **slow}, stdout=subprocess.PIPE)
    labels = tmp_path / "labels.zarr" / "s0"
    deadline = time.monotonic() + 240
    while _chunks_written(labels) < 1 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be killed: " + first.stdout.read().decode()[-2000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    for name in ("p.zarr", "labels.zarr"):
        assert _tree(tmp_path / name) == _tree(full_reference / name), f"{name} differs after the restart"
