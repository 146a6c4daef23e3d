"""Every stage's failures count: a failed pyramid or mesh block is listed, and the next run repairs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import em_like, write_raw
from test_instances_blockwise import generator_probabilities, write_probs

from pipeline.config.instances import InstancesConfig
from pipeline.config.segment import SegmentConfig
from pipeline.instances.run import run_instances
from pipeline.segment import segment
from pipeline.viewing.meshes import MeshBlock
from pipeline.viewing.pyramid import DownsampleBlock
from pipeline.volumes import open_volume, parse_volume_url, volume_exists

SHAPE = (16, 64, 64)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_raw(f"zarr://file://{tmp_path_factory.mktemp('raw')}/em.zarr/raw", em_like(SHAPE))


def job(raw: str, out: str, checkpoint: Path) -> SegmentConfig:
    return SegmentConfig(
        input=raw, output=[out], checkpoint=checkpoint, chunk_size=(8, 16, 16), block_size=(16, 32, 32)
    )


def levels(url: str) -> list[np.ndarray]:
    """Every level above 0 of a volume."""
    found, scale = [], 1
    while volume_exists(url, scale=scale):
        volume = open_volume(url, scale=scale)
        found.append(volume.read(volume.meta.roi))
        scale += 1
    return found


def fail_block(cls: type, monkeypatch: pytest.MonkeyPatch, wanted: Any) -> None:
    """Make `cls`'s per-block task raise, on every try, for the blocks where `wanted(task, block)` holds."""
    original = cls.__call__

    def broken(self: Any, block: Any) -> Any:
        if wanted(self, block):
            raise OSError(f"injected: block {block.block_id[1]} cannot be written")
        return original(self, block)

    monkeypatch.setattr(cls, "__call__", broken)


def test_a_failed_pyramid_block_is_listed_and_the_next_run_rebuilds_the_level(
    client: Any, raw: str, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = f"zarr://file://{tmp_path}/clean.zarr/probs"
    assert segment(job(raw, clean, tiny_checkpoint), client=client, progress=False).failures == []
    out = str(parse_volume_url(f"zarr://file://{tmp_path}/out.zarr/probs"))
    with monkeypatch.context() as patch:
        fail_block(DownsampleBlock, patch, lambda task, block: task.level.index == 1)
        failed = segment(job(raw, out, tiny_checkpoint), client=client, progress=False)
    assert failed.run.ok and failed.run.completed == failed.run.total
    [failure] = failed.failures
    assert failure.unit == f"{out} pyramid s1 block" and failure.block_id == 0 and "injected" in failure.error

    repaired = segment(job(raw, out, tiny_checkpoint), client=client, progress=False)
    assert repaired.run.completed == 0 and repaired.failures == []
    assert out in repaired.extra["pyramids"]  # rebuilt although no segment block changed
    reference, got = levels(clean), levels(out)
    assert len(got) == len(reference) >= 1
    assert all(np.array_equal(a, b) for a, b in zip(got, reference, strict=True))

    unchanged = segment(job(raw, out, tiny_checkpoint), client=client, progress=False)
    assert unchanged.failures == [] and "pyramids" not in unchanged.extra  # a finished pyramid is not rebuilt


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_mesh_and_pyramid_blocks_of_instances_count_and_a_rerun_repairs_them(
    client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_probs(f"zarr://file://{tmp_path}/probs.zarr", generator_probabilities((16, 28, 30), seed=3))

    def config(name: str) -> InstancesConfig:
        return InstancesConfig(input=source, output=f"{tmp_path}/{name}.zarr", block_size=(8, 16, 16))

    clean = run_instances(config("clean"), client, progress=False)
    assert clean.ok and clean.meshes is not None and clean.meshes.objects > 0
    with monkeypatch.context() as patch:
        fail_block(MeshBlock, patch, lambda task, block: block.block_id[1] == 0)
        fail_block(DownsampleBlock, patch, lambda task, block: task.level.index == 2)
        failed = run_instances(config("seg"), client, progress=False)
    assert not failed.ok and failed.relabel is not None and failed.relabel.ok
    units = sorted({f.unit for f in failed.failures})
    assert units == [f"{failed.output} mesh block", f"{failed.output} pyramid s2 block"]

    repaired = run_instances(config("seg"), client, progress=False)
    assert repaired.ok and repaired.failures == []
    assert repaired.decode.completed == 0 and repaired.relabel is not None and repaired.relabel.completed == 0
    assert all(np.array_equal(a, b) for a, b in zip(levels(failed.output), levels(clean.output), strict=True))
    assert len(levels(failed.output)) == len(levels(clean.output)) >= 2
    assert files_under(tmp_path / "seg.zarr" / "meshes") == files_under(tmp_path / "clean.zarr" / "meshes")


def test_a_lease_taken_over_during_the_run_is_a_failure_of_the_run(
    client: Any, raw: str, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.segment
    from pipeline.lease import Lease

    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    location = parse_volume_url(out).location
    intruders: list[Lease] = []
    original = pipeline.segment._execute_and_finish

    def another_run_breaks_in(*args: Any) -> Any:
        intruders.append(Lease(location, force=True))
        intruders[0].acquire()
        return original(*args)

    monkeypatch.setattr(pipeline.segment, "_execute_and_finish", another_run_breaks_in)
    result = segment(job(raw, out, tiny_checkpoint), client=client, progress=False)
    [failure] = result.failures
    assert failure.unit == f"{location} lease" and "another run took over" in failure.error
    assert intruders[0].holder().owner == intruders[0].owner  # type: ignore[union-attr]  # left to its new holder
    intruders[0].release()
