"""Re-runs never lie (issue 23): each scenario that made a re-run report a wrong output as complete.

Every test re-runs a segment job after something changed (the output, the input, the network, the precision)
and checks what was recomputed, that the data equals an uninterrupted run's, and that provenance agrees.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import em_like, write_raw
from daisy import Roi

from pipeline.config.segment import SegmentConfig
from pipeline.errors import ModelLoadError, StorageError
from pipeline.execution import run_blockwise
from pipeline.segment import prepare, segment
from pipeline.volumes import open_volume, resolve_version

pytestmark = pytest.mark.cluster
SHAPE = (16, 64, 64)
BLOCK = (8, 32, 32)  # 8 blocks


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny network, with other weights than `tiny_checkpoint`."""
    import torch

    from pipeline.config.network import NetworkConfig
    from pipeline.network.checkpoint import save_checkpoint
    from pipeline.network.model import build_network

    torch.manual_seed(1)
    cfg = NetworkConfig(widths=[4, 8], context=(1, 4, 4), embedding_dim=8)
    path = tmp_path_factory.mktemp("ckpt_b") / "other.pt"
    save_checkpoint(path, network_config=cfg, state_dict=build_network(cfg).state_dict(), patch_shape=(8, 32, 32))
    return path


@pytest.fixture
def raw_url(tmp_path: Path) -> str:
    return write_raw(f"zarr://file://{tmp_path}/em.zarr/raw", em_like(SHAPE), chunks=(8, 16, 16))


def config(raw: str, out: str, ckpt: Path, **kw: Any) -> SegmentConfig:
    defaults = dict(input=raw, output=[out], checkpoint=ckpt, block_size=BLOCK, chunk_size=(8, 16, 16), pyramid=False)
    return SegmentConfig(**{**defaults, **kw})


def read_all(url: str) -> np.ndarray:
    vol = open_volume(url)
    return vol.read(vol.meta.roi)


def solo(client: Any, raw: str, ckpt: Path, tmp_path: Path, name: str, **kw: Any) -> np.ndarray:
    """The output of one uninterrupted run into a fresh output."""
    out = f"zarr://file://{tmp_path}/{name}.zarr/probs"
    assert segment(config(raw, out, ckpt, **kw), client=client, progress=False).run.ok
    return read_all(out)


def test_deleted_output_with_state_left_is_recomputed(client, raw_url, tiny_checkpoint, tmp_path) -> None:
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    first = segment(config(raw_url, out, tiny_checkpoint), client=client, progress=False).run
    expected = read_all(out)
    shutil.rmtree(tmp_path / "p.zarr/probs")  # the state beside it, p.zarr/probs.mitoseg, stays
    again = segment(config(raw_url, out, tiny_checkpoint), client=client, progress=False).run
    assert again.completed == first.total and again.unchanged == again.skipped == 0
    assert (expected > 0).any() and np.array_equal(read_all(out), expected)
    assert open_volume(out).provenance["complete"] is True


def test_an_unchanged_rerun_computes_nothing_not_even_the_pyramid(client, raw_url, tiny_checkpoint, tmp_path) -> None:
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    first = segment(config(raw_url, out, tiny_checkpoint, pyramid=True), client=client, progress=False)
    assert first.run.completed == first.run.total and out in first.extra["pyramids"]
    level = sorted(p.stat().st_mtime_ns for p in (tmp_path / "p.zarr/probs/s1").rglob("*") if p.is_file())
    again = segment(config(raw_url, out, tiny_checkpoint, pyramid=True), client=client, progress=False)
    assert (again.run.completed, again.run.unchanged, again.run.failed) == (0, first.run.total, 0)
    assert "pyramids" not in again.extra
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "p.zarr/probs/s1").rglob("*") if p.is_file()) == level


def test_output_that_cannot_be_opened_is_an_error_and_nothing_is_deleted(
    client, raw_url, tiny_checkpoint, tmp_path
) -> None:
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    assert segment(config(raw_url, out, tiny_checkpoint), client=client, progress=False).run.ok
    chunks = sorted((tmp_path / "p.zarr/probs/s0").rglob("*"))
    meta = tmp_path / "p.zarr/probs/zarr.json"
    meta.write_text(meta.read_text()[:20])  # truncated
    pattern = r"p.zarr/probs exists but cannot be opened.*nothing was changed.*--overwrite"
    with pytest.raises(StorageError, match=pattern):
        prepare(config(raw_url, out, tiny_checkpoint))
    assert sorted((tmp_path / "p.zarr/probs/s0").rglob("*")) == chunks and meta.read_text()
    replaced = segment(config(raw_url, out, tiny_checkpoint, overwrite=True), client=client, progress=False).run
    assert replaced.completed == replaced.total  # --overwrite re-creates it, and no old record applies


def test_checkpoint_a_then_b_then_a_leaves_a_and_says_a(
    client, raw_url, tiny_checkpoint, other_checkpoint, tmp_path
) -> None:
    a = solo(client, raw_url, tiny_checkpoint, tmp_path, "a")
    b = solo(client, raw_url, other_checkpoint, tmp_path, "b")
    assert not np.array_equal(a, b)
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    for ckpt in (tiny_checkpoint, other_checkpoint):
        run = segment(config(raw_url, out, ckpt), client=client, progress=False).run
        assert run.completed == run.total  # a new network writes a new version of every block
    assert np.array_equal(read_all(str(resolve_version(out))), b)  # readers see B once it is complete
    assert np.array_equal(read_all(out), a)  # A's version stays, whole, beside it
    back = segment(config(raw_url, out, tiny_checkpoint), client=client, progress=False).run
    assert (back.completed, back.unchanged) == (0, back.total)  # A's complete version is found again, not redone
    current = str(resolve_version(out))
    assert current == out and np.array_equal(read_all(current), a)
    provenance = open_volume(current).provenance
    assert provenance["checkpoint"] == str(tiny_checkpoint) and provenance["complete"] is True
    assert (
        provenance["checkpoint_hash"]
        == open_volume(f"zarr://file://{tmp_path}/a.zarr/probs").provenance["checkpoint_hash"]
    )


def test_an_input_chunk_rewritten_in_place_recomputes_exactly_the_blocks_that_read_it(
    client, tiny_checkpoint, tmp_path
) -> None:
    raw_url = write_raw(f"zarr://file://{tmp_path}/wide.zarr/raw", em_like((16, 96, 96)), chunks=(8, 16, 16))
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    cfg = config(raw_url, out, tiny_checkpoint)
    assert segment(cfg, client=client, progress=False).run.ok
    unchanged = segment(cfg, client=client, progress=False).run
    assert (unchanged.completed, unchanged.unchanged) == (0, unchanged.total)  # an unchanged job computes nothing
    run = prepare(cfg)
    before = run.done.load()
    chunk = Roi((8, 0, 0), (8, 16, 16))  # a corner chunk: read by 8 of the 18 blocks (with their context)
    source = open_volume(raw_url, mode="r+")
    source.write(chunk, (255 - source.read(chunk)).astype(np.uint8))
    # the blocks whose read region (write region plus the network's context and patch grid) meets the chunk
    expected = {b.block_id[1] for b in run.plan.blocks() if run.job.grid.read_roi(b.write_roi).intersects(chunk)}
    assert 0 < len(expected) < run.plan.num_blocks
    again = segment(cfg, client=client, progress=False).run
    assert (again.completed, again.unchanged, again.failed) == (len(expected), again.total - len(expected), 0)
    after = prepare(cfg).done.load()
    assert {b for b in range(again.total) if before.get(b) != after.get(b)} == expected
    assert np.array_equal(read_all(out), solo(client, raw_url, tiny_checkpoint, tmp_path, "fresh"))


def test_a_precision_change_recomputes_and_is_recorded(client, raw_url, tiny_checkpoint, tmp_path) -> None:
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    full = dict(precision="float32")
    first = segment(config(raw_url, out, tiny_checkpoint, **full), client=client, progress=False).run
    half = segment(config(raw_url, out, tiny_checkpoint, precision="bfloat16"), client=client, progress=False)
    current = str(resolve_version(out))
    assert half.run.completed == first.total and open_volume(current).provenance["precision"] == "bfloat16"
    assert not np.array_equal(read_all(current), solo(client, raw_url, tiny_checkpoint, tmp_path, "full", **full))
    back = segment(config(raw_url, out, tiny_checkpoint, **full), client=client, progress=False)
    assert half.job_key != back.job_key and back.run.unchanged == first.total  # float32's version is still whole
    assert open_volume(str(resolve_version(out))).provenance["precision"] == "float32"


def test_a_recreated_output_is_never_written_through_stale_worker_caches(
    client, raw_url, tiny_checkpoint, tmp_path
) -> None:
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    assert segment(config(raw_url, out, tiny_checkpoint), client=client, progress=False).run.ok
    # the same long-lived workers; the output re-created with other chunks
    recreated = config(raw_url, out, tiny_checkpoint, chunk_size=(8, 32, 32), overwrite=True)
    assert segment(recreated, client=client, progress=False).run.ok
    assert open_volume(out).meta.chunks == (8, 32, 32)
    assert np.array_equal(read_all(out), solo(client, raw_url, tiny_checkpoint, tmp_path, "ref"))


def test_two_checkpoints_on_one_cluster_each_run_their_own_network(
    client, raw_url, tiny_checkpoint, other_checkpoint, tmp_path
) -> None:
    from workers.plugin import ModelPlugin
    from workers.predict_block import predict_block

    a = solo(client, raw_url, tiny_checkpoint, tmp_path, "a")
    b = solo(client, raw_url, other_checkpoint, tmp_path, "b")
    runs = {
        name: prepare(config(raw_url, f"zarr://file://{tmp_path}/{name}2.zarr/probs", ckpt))
        for name, ckpt in (("a", tiny_checkpoint), ("b", other_checkpoint))
    }
    for run in runs.values():  # both networks loaded before either job's blocks run
        client.register_plugin(ModelPlugin(run.config.checkpoint, content_hash=run.checkpoint_hash))
    for run in runs.values():
        task = partial_predict(predict_block, run)
        assert run_blockwise(client, run.plan, task, done=run.done, check_on_worker=True, progress=False).ok
    assert np.array_equal(read_all(runs["a"].outputs[0]), a) and np.array_equal(read_all(runs["b"].outputs[0]), b)
    # and two whole jobs at once on the shared cluster
    results: dict[str, Any] = {}
    jobs = {"a": tiny_checkpoint, "b": other_checkpoint}

    def one(name: str) -> None:
        cfg = config(raw_url, f"zarr://file://{tmp_path}/{name}3.zarr/probs", jobs[name])
        results[name] = segment(cfg, client=client, progress=False).run

    threads = [threading.Thread(target=one, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["a"].ok and results["b"].ok
    assert np.array_equal(read_all(f"zarr://file://{tmp_path}/a3.zarr/probs"), a)
    assert np.array_equal(read_all(f"zarr://file://{tmp_path}/b3.zarr/probs"), b)


def test_a_block_without_its_network_on_the_worker_fails_naming_it(client, raw_url, tiny_checkpoint, tmp_path) -> None:
    from workers.predict_block import predict_block

    run = prepare(config(raw_url, f"zarr://file://{tmp_path}/p.zarr/probs", tiny_checkpoint))
    missing = partial_predict(predict_block, run, network="mitoseg-model-0000000000000000-auto-auto")
    result = run_blockwise(client, run.plan, missing, done=run.done, check_on_worker=True, retries=0, progress=False)
    assert result.failed == result.total
    assert "ModelLoadError" in result.failures[0].error and "no network mitoseg-model-0000" in result.failures[0].error
    with pytest.raises(ModelLoadError, match="does not run the network this job planned"):
        from pipeline.segment import execute
        from workers.plugin import ModelPlugin

        execute(run, client, plugin=ModelPlugin(tiny_checkpoint, precision="bfloat16"), progress=False)


def partial_predict(predict_block: Any, run: Any, **changes: Any) -> Any:
    """The block task of `run` (its job with `changes`), as `pipeline.segment.execute` submits it."""
    import dataclasses
    from functools import partial

    return partial(predict_block, job=dataclasses.replace(run.job, **changes))


def test_a_block_never_writes_into_an_output_replaced_under_its_job(raw_url, tiny_checkpoint, tmp_path) -> None:
    from pipeline.volumes import create_volume
    from workers.patch_predictor import Predictor
    from workers.predict_block import predict_block

    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    run = prepare(config(raw_url, out, tiny_checkpoint))
    block = next(iter(run.plan.blocks()))
    predictor = Predictor(str(tiny_checkpoint), device="cpu")
    written = predict_block(block, job=run.job, predictor=predictor)
    assert written.value == block.write_roi.size and not written.unchanged
    assert predict_block(block, written.record, job=run.job, predictor=predictor).unchanged  # same input, same job
    replacement = create_volume(out, open_volume(out).meta)  # another run re-created it meanwhile
    replacement.set_provenance({"output_id": "someone else's"})
    with pytest.raises(StorageError, match="was replaced while this job ran.*someone else's"):
        predict_block(block, job=run.job, predictor=predictor)
    assert (read_all(out) == 0).all()


def test_every_setting_that_changes_the_bytes_changes_the_job_key(
    raw_url, tiny_checkpoint, other_checkpoint, tmp_path
) -> None:
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    changes: dict[str, dict[str, Any]] = {
        "same": {},
        "checkpoint": {"checkpoint": other_checkpoint},
        "precision": {"precision": "bfloat16"},
        "device": {"device": "cpu"},
        "tta": {"tta": "yx"},
        "median": {"median_size": 3},
        "blending": {"blending": "bump"},
        "overlap": {"overlap": 0.5},
        "patch": {"patch_shape": (8, 16, 16)},
    }
    keys = {name: prepare(config(raw_url, out, tiny_checkpoint, **kw)).job.key for name, kw in changes.items()}
    assert len(set(keys.values())) == len(keys)
    assert prepare(config(raw_url, out, tiny_checkpoint)).job.key == keys["same"]
    assert prepare(config(raw_url, out, tiny_checkpoint, output_dtype="float32", overwrite=True)).job.key not in (
        keys.values()
    )


def test_a_new_network_writes_a_version_beside_the_last_and_switches_when_complete(
    client, raw_url, tiny_checkpoint, other_checkpoint, tmp_path
) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.faults import FailWrites

    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    assert segment(config(raw_url, out, tiny_checkpoint), client=client, progress=False).run.ok
    a = read_all(out)
    fault = FailWrites([(8, 32, 32)], str(tmp_path / "markers"), always=True)
    client.register_plugin(fault)
    try:
        failed = segment(config(raw_url, out, other_checkpoint, retries=0), client=client, progress=False)
    finally:
        client.unregister_worker_plugin(fault.name)
    assert len(failed.run.failures) == 1
    assert str(resolve_version(out)) == out and np.array_equal(read_all(out), a)  # readers still see A, whole
    finished = segment(config(raw_url, out, other_checkpoint), client=client, progress=False)
    assert finished.run.completed == 1  # the new version resumes: only its failed block is computed
    current = str(resolve_version(out))
    assert current == finished.outputs[0] != out
    assert np.array_equal(read_all(current), solo(client, raw_url, other_checkpoint, tmp_path, "b"))
    assert np.array_equal(read_all(out), a)  # the earlier version stays until pruned
    listing = CliRunner().invoke(app, ["versions", "list", out]).output
    assert "original" in listing and f"* {finished.job_key}" in listing


def test_an_unchanged_rerun_with_instances_runs_no_stage_and_a_changed_input_redoes_them(
    client, raw_url, tiny_checkpoint, tmp_path
) -> None:
    from pipeline.config.instances import InstancesConfig

    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    labels = f"zarr://file://{tmp_path}/instances.zarr"
    table = tmp_path / "objects.csv"
    follow = InstancesConfig(output=labels, table=str(table), decode={"min_size": 0, "seed_threshold": 0.0})
    cfg = config(raw_url, out, tiny_checkpoint, instances=follow)
    first = segment(cfg, client=client, progress=False)
    assert first.extra["instances"].ok and first.extra["instances"].relabel.completed > 0
    written = sorted(p.stat().st_mtime_ns for p in (tmp_path / "instances.zarr").rglob("*") if p.is_file())
    again = segment(cfg, client=client, progress=False)
    instances = again.extra["instances"]
    assert again.run.completed == 0 and instances.ok
    assert [(r.completed, r.unchanged) for r in instances.passes] == [(0, instances.decode.total)] * 3
    assert instances.num_objects == first.extra["instances"].num_objects and instances.pyramid is None
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "instances.zarr").rglob("*") if p.is_file()) == written
    source = open_volume(raw_url, mode="r+")
    corner = Roi((0, 0, 0), (8, 16, 16))
    source.write(corner, (255 - source.read(corner)).astype(np.uint8))
    changed = segment(cfg, client=client, progress=False)
    assert changed.run.completed > 0
    assert changed.extra["instances"].relabel.completed == changed.extra["instances"].decode.total  # labels redone


def test_labels_of_a_new_network_are_a_new_version_of_the_instances_output(
    client, raw_url, tiny_checkpoint, other_checkpoint, tmp_path
) -> None:
    from pipeline.config.instances import InstancesConfig

    labels = f"zarr://file://{tmp_path}/instances.zarr"
    follow = InstancesConfig(output=labels, decode={"min_size": 0, "seed_threshold": 0.0})
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    first = segment(config(raw_url, out, tiny_checkpoint, instances=follow), client=client, progress=False)
    a = read_all(labels)
    second = segment(config(raw_url, out, other_checkpoint, instances=follow), client=client, progress=False)
    assert second.extra["instances"].ok and second.extra["instances"].output != labels
    current = str(resolve_version(labels))
    assert current == second.extra["instances"].output
    assert np.array_equal(read_all(labels), a)  # the first network's labels stay whole beside the new ones
    assert open_volume(current).provenance["complete"] is True and first.extra["instances"].output == labels
