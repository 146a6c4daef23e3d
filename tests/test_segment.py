"""The segment pipeline end to end on a real LocalCluster: seam-free, resumable, failure-tolerant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import em_like, write_raw
from daisy import Roi

from pipeline.config.segment import SegmentConfig
from pipeline.errors import BlockFailedError, ConfigError, GeometryError, ModelLoadError, StorageError
from pipeline.evaluation import evaluate_semantic
from pipeline.resume import BlockRecords
from pipeline.segment import segment
from pipeline.volumes import open_volume
from workers.plugin import ModelPlugin

pytestmark = pytest.mark.cluster
SHAPE = (24, 80, 72)  # not a multiple of any block size used below


@pytest.fixture(scope="module")
def clients():
    """One single-worker and one two-worker LocalCluster, shared by the module's tests."""
    from pipeline.cluster import dask_client
    from pipeline.config.cluster import LocalClusterConfig

    with dask_client(LocalClusterConfig(workers=1)) as one, dask_client(LocalClusterConfig(workers=2)) as two:
        yield {1: one, 2: two}


@pytest.fixture(scope="module")
def raw_url(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("raw")
    return write_raw(f"zarr://file://{path}/em.zarr/raw", em_like(SHAPE))


def config(raw_url: str, out: str, ckpt: Path, **kw) -> SegmentConfig:
    defaults = dict(input=raw_url, output=[out], checkpoint=ckpt, chunk_size=(8, 16, 16), pyramid=False)
    return SegmentConfig(**{**defaults, **kw})


def read_all(url: str) -> np.ndarray:
    vol = open_volume(url)
    return vol.read(vol.meta.roi)


@pytest.fixture(scope="module")
def reference(clients, raw_url, tiny_checkpoint, tmp_path_factory) -> np.ndarray:
    """A one-block run of the whole volume."""
    out = f"zarr://file://{tmp_path_factory.mktemp('ref')}/p.zarr/probs"
    result = segment(config(raw_url, out, tiny_checkpoint, block_size=(32, 96, 96)), client=clients[1], progress=False)
    assert result.run.total == 1 and result.run.ok
    return read_all(out)


@pytest.mark.parametrize(
    ("block", "workers"), [((8, 16, 16), 1), ((8, 32, 48), 2), ((16, 48, 32), 2), ((8, 16, 16), 2)]
)
def test_blockwise_equals_one_block(clients, raw_url, tiny_checkpoint, reference, tmp_path, block, workers) -> None:
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    result = segment(config(raw_url, out, tiny_checkpoint, block_size=block), client=clients[workers], progress=False)
    assert result.run.ok and result.run.completed == result.run.total > 1
    got = read_all(out)
    assert got.shape == reference.shape == (1, *SHAPE) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - reference.astype(int))
    # Documented guarantee: identical patches everywhere; float kernels may round differently with another
    # thread count, which moves a uint8 value by at most one step.
    assert diff.max() <= 1
    assert (diff == 0).mean() > 0.999


def test_sub_roi_rerun_matches_and_precomputed_output(clients, raw_url, tiny_checkpoint, reference, tmp_path) -> None:
    zarr_out = f"zarr://file://{tmp_path}/p.zarr/probs"
    pre_out = f"precomputed://file://{tmp_path}/probs"
    cfg = config(raw_url, zarr_out, tiny_checkpoint, output=[zarr_out, pre_out], roi="3,10,20:13,50,40")
    cfg = cfg.model_copy(update={"block_size": (8, 32, 32)})
    assert segment(cfg, client=clients[2], progress=False).run.ok
    for url in (zarr_out, pre_out):
        got = read_all(url)[:, 3:16, 10:60, 20:60]
        assert np.abs(got.astype(int) - reference[:, 3:16, 10:60, 20:60].astype(int)).max() <= 1
    pre = open_volume(pre_out)
    assert pre.meta.voxel_size_nm == (8.0, 4.0, 4.0) and pre.provenance["checkpoint_hash"]
    assert pre.provenance["complete"] is True and open_volume(zarr_out).provenance["complete"] is True


def test_instances_after_segment_decode_only_its_roi(clients, raw_url, tiny_checkpoint, tmp_path) -> None:
    from pipeline.config.instances import InstancesConfig

    labels = f"zarr://file://{tmp_path}/seg.zarr/labels"
    section = InstancesConfig(output=labels, block_size=(8, 16, 16), viewing=False)
    cfg = config(raw_url, f"zarr://file://{tmp_path}/p.zarr/probs", tiny_checkpoint, block_size=(8, 16, 16))
    cfg = cfg.model_copy(update={"roi": "8,16,16:8,32,16", "instances": section})
    follow = segment(cfg, client=clients[1], progress=False).extra["instances"]
    assert follow.decode.ok and follow.decode.total == 2  # the roi's 2 blocks, not the volume's 75


def test_instances_after_a_sharded_segment_write_sharded_labels(clients, raw_url, tiny_checkpoint, tmp_path) -> None:
    from pipeline.config.instances import InstancesConfig

    labels = f"zarr3://file://{tmp_path}/seg.zarr/labels"
    section = InstancesConfig(output=labels, viewing=False)
    probs = f"zarr3://file://{tmp_path}/p.zarr/probs"
    cfg = config(raw_url, probs, tiny_checkpoint, block_size=(8, 32, 32), shard_size=(8, 32, 32))
    cfg = cfg.model_copy(update={"roi": "0,0,0:8,64,64", "instances": section})
    follow = segment(cfg, client=clients[1], progress=False).extra["instances"]
    assert follow.ok and open_volume(labels).meta.shards == (8, 32, 32) == open_volume(probs).meta.shards


@pytest.mark.parametrize(
    ("output", "block", "shards"),
    [
        ("zarr3://l.zarr", None, (8, 32, 32)),
        ("precomputed://l", (16, 64, 32), (8, 32, 32)),
        ("zarr2://l.zarr", None, None),  # zarr v2 cannot shard: the labels stay unsharded, as before
        ("zarr3://l.zarr", (8, 16, 16), None),  # blocks smaller than the shards: the section's blocks win
    ],
)
def test_nested_instances_take_the_segment_shards_where_they_fit(output, block, shards) -> None:
    from pipeline.config.instances import InstancesConfig
    from pipeline.segment import _label_shards

    assert _label_shards(InstancesConfig(output=output, block_size=block), (8, 32, 32)) == shards
    assert _label_shards(InstancesConfig(output=output, block_size=block), None) is None


def test_resume_skips_done_blocks_and_changed_network_recomputes(clients, raw_url, tiny_checkpoint, tmp_path) -> None:
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    cfg = config(raw_url, out, tiny_checkpoint, block_size=(16, 48, 48))
    first = segment(cfg, client=clients[1], progress=False).run
    assert first.completed == first.total and first.skipped == 0
    again = segment(cfg, client=clients[1], progress=False).run
    assert again.completed == 0 and again.unchanged == first.total and again.skipped == 0
    changed = segment(cfg.model_copy(update={"overlap": 0.5}), client=clients[1], progress=False).run
    assert changed.completed == first.total  # a different plan never reuses stale marks
    fresh = segment(cfg.model_copy(update={"resume": False}), client=clients[1], progress=False).run
    assert fresh.completed == first.total


class FailOncePlugin(ModelPlugin):
    """The first patch any worker predicts raises once (a transient fault), then all goes well."""

    def __init__(self, *args, flag: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.flag = flag

    def setup(self, worker) -> None:
        super().setup(worker)
        real, flag = self.predictor, self.flag

        class FailOnce:
            def __call__(self, patch):
                if not flag.exists():
                    flag.touch()
                    raise RuntimeError("injected transient failure")
                return real(patch)

        self.predictor = FailOnce()


def test_block_failing_once_is_retried(clients, raw_url, tiny_checkpoint, reference, tmp_path) -> None:
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    plugin = FailOncePlugin(tiny_checkpoint, flag=tmp_path / "failed")
    run = segment(
        config(raw_url, out, tiny_checkpoint, block_size=(8, 32, 32)), client=clients[2], plugin=plugin, progress=False
    ).run
    assert (tmp_path / "failed").exists() and run.ok and run.completed == run.total
    assert np.abs(read_all(out).astype(int) - reference.astype(int)).max() <= 1


def test_block_that_always_fails_is_reported_and_others_written(clients, raw_url, tiny_checkpoint, tmp_path) -> None:
    from pipeline.segment import prepare

    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    cfg = config(raw_url, out, tiny_checkpoint, block_size=(8, 32, 32), retries=1)
    prepare(cfg)
    (tmp_path / "p.zarr/probs/s0/c/0/2/4/4").mkdir(parents=True)  # the chunk of the last block cannot be written
    run = segment(cfg, client=clients[2], progress=False).run
    assert run.failed == 1 and run.completed == run.total - 1
    assert run.failures[0].write_roi == "16,64,64:8,16,8" and "cannot write region" in run.failures[0].error
    got = read_all(out)
    assert (got[:, :16] > 0).all() and (got[:, 16:, :64] > 0).all()  # every other block was written
    again = segment(cfg, client=clients[2], progress=False).run
    assert again.unchanged == run.total - 1 and again.failed == 1 and again.completed == 0
    assert open_volume(out).provenance["complete"] is False
    with pytest.raises(BlockFailedError, match="is incomplete.*run the same segment command again.*evaluating"):
        evaluate_semantic(out, raw_url)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"input": "zarr://file:///nonexistent/em.zarr/raw"}, StorageError, "no zarr array"),
        ({"roi": "20,0,0:10,10,10"}, GeometryError, "outside the volume"),
        ({"checkpoint": Path("/nonexistent.pt")}, ModelLoadError, "does not exist"),
        ({"block_size": (8, 20, 16)}, GeometryError, "whole number of output chunks"),
        ({"patch_shape": (8, 31, 32)}, ConfigError, "divisible"),
    ],
)
def test_bad_jobs_fail_before_any_work(raw_url, tiny_checkpoint, tmp_path, change, error, pattern) -> None:
    from pipeline.segment import prepare

    cfg = config(raw_url, f"zarr://file://{tmp_path}/p.zarr/probs", tiny_checkpoint).model_copy(update=change)
    with pytest.raises(error, match=pattern):
        prepare(cfg)


def test_unsupported_dtype_and_existing_mismatched_output(tiny_checkpoint, tmp_path, raw_url) -> None:
    from pipeline.segment import prepare

    raw = write_raw(f"zarr://file://{tmp_path}/i.zarr/raw", np.zeros(SHAPE, np.int64))
    with pytest.raises(StorageError, match="int64"):
        prepare(config(raw, f"zarr://file://{tmp_path}/p.zarr/a", tiny_checkpoint))
    out = f"zarr://file://{tmp_path}/p.zarr/b"
    prepare(config(raw_url, out, tiny_checkpoint))
    other = write_raw(f"zarr://file://{tmp_path}/other.zarr/raw", np.zeros((8, 32, 32), np.uint8))
    with pytest.raises(StorageError, match="exists with shape"):  # other data into the same output
        prepare(config(other, out, tiny_checkpoint))
    changed = prepare(config(raw_url, out, tiny_checkpoint, output_dtype="float32"))  # a changed setting
    assert changed.outputs[0] != out and open_volume(changed.outputs[0]).meta.dtype == np.float32
    assert open_volume(out).meta.dtype == np.uint8  # written beside, as a new version


def test_roi_region_is_the_only_thing_written(clients, raw_url, tiny_checkpoint, tmp_path) -> None:
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    segment(config(raw_url, out, tiny_checkpoint, roi="8,16,16:8,16,16"), client=clients[1], progress=False)
    got = read_all(out)
    inside = Roi((8, 16, 16), (8, 16, 16))
    mask = np.zeros(SHAPE, bool)
    mask[inside.to_slices()] = True
    assert (got[0][~mask] == 0).all() and (got[0][mask] > 0).any()


def test_killed_run_resumes_to_the_uninterrupted_result(raw_url, tiny_checkpoint, reference, tmp_path) -> None:
    """SIGKILL the whole run (client, scheduler, workers) midway; the same command finishes only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "segment",
        "--input",
        raw_url,
        "--output",
        out,
        "--checkpoint",
        str(tiny_checkpoint),
        "--block-size",
        "8,16,16",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = tmp_path / "p.zarr/probs.mitoseg/segment"

    def recorded() -> int:
        return sum(len(BlockRecords(str(d), "").load()) for d in state.glob("*"))

    deadline = time.time() + 120
    while time.time() < deadline and recorded() < 5 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = recorded()
    total = 3 * 5 * 5
    assert 5 <= finished < total, "the run should have been killed midway"
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"{total - finished} block(s) computed, {finished} skipped" in again.stdout
    assert np.abs(read_all(out).astype(int) - reference.astype(int)).max() <= 1


def test_unreadable_input_chunk_fails_only_its_blocks(clients, tiny_checkpoint, tmp_path) -> None:
    raw = write_raw(f"zarr2://file://{tmp_path}/em.zarr/raw", em_like(SHAPE), chunks=(8, 16, 16))
    (tmp_path / "em.zarr/raw/s0/0.2.4.4").write_bytes(b"damaged")
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    cfg = config(raw, out, tiny_checkpoint, block_size=(8, 32, 32), retries=0)
    run = segment(cfg, client=clients[2], progress=False).run
    assert 0 < run.failed < run.total and run.completed == run.total - run.failed
    assert all("chunk 16,64,64:8,16,8" in f.error for f in run.failures)


def test_test_time_augmentation_stays_seam_free_and_is_its_own_job(
    clients, raw_url, tiny_checkpoint, reference, tmp_path
):
    one = f"zarr://file://{tmp_path}/one.zarr/probs"
    many = f"zarr://file://{tmp_path}/many.zarr/probs"
    whole = segment(
        config(raw_url, one, tiny_checkpoint, block_size=(32, 96, 96), tta="yx"), client=clients[1], progress=False
    )
    split = segment(
        config(raw_url, many, tiny_checkpoint, block_size=(8, 32, 48), tta="yx"), client=clients[2], progress=False
    )
    assert whole.run.ok and split.run.ok and split.run.total > 1
    assert np.abs(read_all(many).astype(int) - read_all(one).astype(int)).max() <= 1
    assert np.abs(read_all(one).astype(int) - reference.astype(int)).max() > 1  # the averaging did change voxels
    assert open_volume(one).provenance["tta"] == "yx"
    plain = segment(config(raw_url, one, tiny_checkpoint, block_size=(32, 96, 96)), client=clients[1], progress=False)
    assert plain.run.completed == 1 and whole.job_key != plain.job_key  # no stale marks across TTA modes


def test_median_filter_stays_seam_free_and_is_its_own_job(clients, raw_url, tiny_checkpoint, reference, tmp_path):
    from pipeline.network.checkpoint import load_checkpoint
    from pipeline.training.validate import predict_volume

    one = f"zarr://file://{tmp_path}/one.zarr/probs"
    many = f"zarr://file://{tmp_path}/many.zarr/probs"
    kw = dict(median_size=5, margin=(2, 6, 6))
    whole = segment(
        config(raw_url, one, tiny_checkpoint, block_size=(32, 96, 96), **kw), client=clients[1], progress=False
    )
    split = segment(
        config(raw_url, many, tiny_checkpoint, block_size=(8, 16, 16), **kw), client=clients[2], progress=False
    )
    assert whole.run.ok and split.run.ok and split.run.total > 1
    filtered = read_all(one)
    np.testing.assert_array_equal(read_all(many), filtered)  # each tile is filtered alone: no seams
    loaded = load_checkpoint(tiny_checkpoint)
    raw = open_volume(raw_url).read(open_volume(raw_url).meta.roi)[0]
    expected = predict_volume(loaded.network, raw, (8, 32, 32), loaded.network.context, **kw)
    assert np.abs(filtered.astype(int) - np.rint(expected * 255)).max() <= 1  # as validation predicts it
    assert np.abs(filtered.astype(int) - reference.astype(int)).max() > 1
    assert open_volume(one).provenance["median_size"] == 5
    plain = segment(config(raw_url, one, tiny_checkpoint, block_size=(32, 96, 96)), client=clients[1], progress=False)
    assert plain.run.completed == 1 and whole.job_key != plain.job_key


def test_blocks_aligned_with_tiles_compute_each_tile_once(raw_url, tiny_checkpoint, tmp_path) -> None:
    """With the median inside tiles, a block needs no prediction beyond its own tiles."""
    from pipeline.segment import prepare
    from workers.predict_block import predict_block

    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    # patch 8x32x32 with a margin of 2 voxels in z and 8 in y, x: tiles of 4x16x16, the block shape
    cfg = config(raw_url, out, tiny_checkpoint, block_size=(4, 16, 16), chunk_size=(4, 16, 16))
    run = prepare(cfg.model_copy(update={"margin": (2, 8, 8), "overlap": (0.0, 0.0, 0.0), "median_size": 3}))
    calls = []

    def network(patch: np.ndarray) -> np.ndarray:
        calls.append(patch.shape)
        return np.full((1, *(p - 2 * c for p, c in zip(patch.shape[1:], (1, 4, 4), strict=True))), 0.5, np.float32)

    # blocks away from the far faces, where the last tile moves back to end at the border (x 72 = 4 x 16 + 8)
    inside = [b for b in run.plan.blocks() if b.write_roi.end[2] <= 48 and b.write_roi.end[1] <= 64][:5]
    for block in inside:
        predict_block(block, job=run.job, predictor=network)
    assert len(inside) == 5 and len(calls) == 5 and run.job.tile_trim == (1, 4, 4)


def test_the_checkpoints_median_is_the_default_and_zero_turns_it_off(clients, raw_url, tiny_checkpoint, tmp_path):
    from pipeline.network.checkpoint import export_checkpoint

    recommending = tmp_path / "median.pt"
    export_checkpoint(tiny_checkpoint, recommending, median_size=5)
    runs = {"default": (recommending, None), "explicit": (tiny_checkpoint, 5), "off": (recommending, 0)}
    out = {name: f"zarr://file://{tmp_path}/{name}.zarr/probs" for name in runs}
    for name, (ckpt, median) in runs.items():
        cfg = config(raw_url, out[name], ckpt, block_size=(32, 96, 96), median_size=median)
        assert segment(cfg, client=clients[1], progress=False).run.ok
    assert open_volume(out["default"]).provenance["median_size"] == 5
    np.testing.assert_array_equal(read_all(out["default"]), read_all(out["explicit"]))
    assert open_volume(out["off"]).provenance["median_size"] == 0
    assert np.abs(read_all(out["off"]).astype(int) - read_all(out["default"]).astype(int)).max() > 1


def _start_environment() -> bytes:
    with open("/proc/self/environ", "rb") as handle:  # the environment the process was started with
        return handle.read()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_local_workers_start_with_tuned_malloc_and_their_thread_share(clients) -> None:
    """glibc reads MALLOC_* once at process start: they must be in the worker's initial environment, also of a
    worker the nanny restarted (after its worker died)."""
    clients[2].restart()
    for client in clients.values():
        for start_env in client.run(_start_environment).values():
            variables = dict(v.split(b"=", 1) for v in start_env.split(b"\0") if b"=" in v)
            assert variables[b"MALLOC_MMAP_MAX_"] == b"0" and int(variables[b"MALLOC_TRIM_THRESHOLD_"]) >= 2**30
    threads = {
        n: set(c.run(lambda: __import__("os").environ["MITOSEG_TORCH_THREADS"]).values()) for n, c in clients.items()
    }
    cores = __import__("os").cpu_count() or 1
    assert threads == {1: {str(cores)}, 2: {str(max(1, cores // 2))}}
