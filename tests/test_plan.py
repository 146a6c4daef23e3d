"""Block plan geometry on tiny volumes with hand-computed answers, and its arithmetic ownership proof
checked against an exhaustive owner array (the validation plans used before they became O(1))."""

from __future__ import annotations

import itertools
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from daisy import Roi

from pipeline.errors import GeometryError
from pipeline.geometry import cell_ranges
from pipeline.plan import BlockPlan, common_shard, plan_blocks

ROOT = Path(__file__).resolve().parents[1]


def shared_chunk(plan: BlockPlan, unit: tuple[int, int, int]) -> bool:
    """Whether two blocks of `plan` write into one cell of the `unit` grid: the old exhaustive check."""
    grid = tuple(len(r) for r in cell_ranges(Roi((0, 0, 0), plan.volume_shape), unit))
    owner = np.full(grid, -1, dtype=np.int64)
    for block in plan.blocks():
        cells = tuple(slice(r.start, r.stop) for r in cell_ranges(block.write_roi, unit))
        if (owner[cells] >= 0).any():
            return True
        owner[cells] = block.block_id[1]
    return False


def test_blocks_tile_the_volume_on_the_chunk_grid() -> None:
    plan = plan_blocks((10, 20, 30), (5, 10, 10), (5, 10, 20))
    assert plan.grid_shape == (2, 2, 2) and plan.num_blocks == 8
    writes = [b.write_roi for b in plan.blocks()]
    assert writes[0] == Roi((0, 0, 0), (5, 10, 20))
    assert writes[1] == Roi((0, 0, 20), (5, 10, 10))  # clipped at the volume end
    assert sum(w.size for w in writes) == 10 * 20 * 30


def test_roi_blocks_stay_on_the_volume_grid_and_grow_by_context() -> None:
    plan = plan_blocks((40, 40, 40), (8, 8, 8), (16, 16, 16), Roi((4, 10, 20), (20, 20, 10)), context=(1, 2, 3))
    writes = [b.write_roi for b in plan.blocks()]
    assert writes[0] == Roi((4, 10, 20), (12, 6, 10))
    assert all(w.begin[0] in (4, 16) for w in writes)
    block = next(plan.blocks())
    assert block.read_roi == Roi((3, 8, 17), (14, 10, 16))
    assert plan.index_of(plan.num_blocks - 1) == tuple(n - 1 for n in plan.grid_shape)


def test_every_block_is_addressable_by_id() -> None:
    plan = plan_blocks((40, 40, 40), (4, 4, 4), (8, 12, 16), Roi((4, 0, 8), (30, 40, 31)))
    listed = list(plan.blocks())
    assert [b.block_id[1] for b in listed] == list(range(plan.num_blocks))
    for block in listed:
        block_id = block.block_id[1]
        assert plan.block_at(plan.index_of(block_id)).block_id[1] == block_id
        assert plan.block(block_id).write_roi == block.write_roi
    writes = [b.write_roi for b in listed]
    assert sum(w.size for w in writes) == plan.roi.size  # a tiling of the region: no gaps, no overlaps
    assert not shared_chunk(plan, plan.chunk_shape)


OUTSIDE = [("index_of", -1), ("index_of", 16), ("block_at", (0, 0, 4)), ("block_at", (2, 0, 0))]


@pytest.mark.parametrize(("call", "arg"), OUTSIDE)
def test_ids_and_indices_outside_the_grid_are_refused(call: str, arg: object) -> None:
    plan = plan_blocks((8, 8, 8), (2, 2, 2), (4, 4, 2))  # a 2 x 2 x 4 grid of 16 blocks
    with pytest.raises(GeometryError, match="outside the plan"):
        getattr(plan, call)(arg)


@pytest.mark.parametrize(
    ("args", "kwargs", "pattern"),
    [
        (((10, 10, 10), (4, 4, 4), (6, 8, 8), None), {}, "not a whole number of output chunks"),
        (((8, 8, 8), (4, 4, 4), (3, 8, 8), None), {}, "not a whole number of output chunks"),  # two blocks, one chunk
        (((8, 8, 8), (4, 4, 4), (0, 8, 8), None), {}, "not a whole number of output chunks"),
        (((8, 8, 8), (4, 0, 4), (4, 8, 8), None), {}, "must be > 0"),
        (((10, 10, 10), (4, 4, 4), (8, 8, 8), Roi((5, 0, 0), (10, 4, 4))), {}, "outside the volume"),
        (((10, 10, 10), (4, 4, 4), (8, 8, 8), Roi((0, 0, 0), (0, 4, 4))), {}, "outside the volume"),
        (((10, 10, 10), (4, 4, 4), (8, 8, 8), None), {"context": (1, -1, 0)}, "context"),
        (((16, 16, 16), (4, 4, 4), (8, 8, 8), None), {"shard_shape": (6, 8, 8)}, "shard shape .* output chunks"),
        (((16, 16, 16), (4, 4, 4), (8, 8, 8), None), {"shard_shape": (16, 8, 8)}, "whole number of output shards"),
        (((16, 16, 16), (2, 2, 2), (4, 12, 8), None), {"shard_shape": (4, 8, 8)}, "whole number of output shards"),
    ],
)
def test_bad_plans_are_refused(args: tuple, kwargs: dict, pattern: str) -> None:
    with pytest.raises(GeometryError, match=pattern):
        plan_blocks(*args, **kwargs)


CASES = list(itertools.product((5, 8, 12), (2, 3, 4), (2, 3, 4, 6, 8), (None, Roi((1, 0, 0), (9, 1, 1)))))


@pytest.mark.parametrize(("length", "chunk", "block", "roi"), CASES)
def test_arithmetic_ownership_agrees_with_the_owner_array(length: int, chunk: int, block: int, roi: Roi | None) -> None:
    """Along z (the other axes one chunk), every plan the arithmetic accepts has one writer per chunk,
    and every misaligned block shape it refuses would have shared a chunk whenever it made two blocks."""
    volume = (length, 2, 2)
    region = roi.intersect(Roi((0, 0, 0), volume)) if roi is not None else None
    if block % chunk == 0:
        plan = plan_blocks(volume, (chunk, 2, 2), (block, 2, 2), region)
        assert not shared_chunk(plan, (chunk, 2, 2))
        return
    with pytest.raises(GeometryError, match="not a whole number"):
        plan_blocks(volume, (chunk, 2, 2), (block, 2, 2), region)
    unchecked = BlockPlan(volume, region or Roi((0, 0, 0), volume), (block, 2, 2), (chunk, 2, 2))
    assert shared_chunk(unchecked, (chunk, 2, 2)) or unchecked.num_blocks == 1


def test_shard_aligned_blocks_own_their_shards() -> None:
    plan = plan_blocks((20, 30, 40), (2, 3, 4), (8, 12, 8), shard_shape=(4, 6, 8))
    assert plan.shard_shape == (4, 6, 8)
    assert not shared_chunk(plan, (4, 6, 8))


def test_blocks_hold_whole_shards_of_every_output() -> None:
    chunks = (4, 8, 8)
    assert common_shard(chunks, [chunks, chunks]) is None
    assert common_shard(chunks, [chunks, (8, 16, 8)]) == (8, 16, 8)
    assert common_shard(chunks, [(8, 16, 8), (4, 8, 24)]) == (8, 16, 24)


def test_a_petabyte_plan_is_built_in_constant_memory() -> None:
    tracemalloc.start()
    plan = plan_blocks((10**5,) * 3, (32, 128, 128), (256, 256, 256), context=(40, 92, 92), shard_shape=(128, 256, 256))
    last = plan.block(plan.num_blocks - 1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert plan.grid_shape == (391, 391, 391) and plan.num_blocks == 391**3
    assert last.write_roi == Roi((99840, 99840, 99840), (160, 160, 160))
    assert peak < 1_000_000  # bytes: nothing proportional to the blocks or chunks


def _plan_cli(*args: str, cwd: Path) -> tuple[int, str, BaseException | None]:
    from typer.testing import CliRunner

    from pipeline.cli import app

    old = os.getcwd()
    os.chdir(cwd)  # the demo's paths are relative, as when a user runs it
    try:
        result = CliRunner().invoke(app, ["plan", *args])
    finally:
        os.chdir(old)
    return result.exit_code, result.output, result.exception


def test_plan_command_sizes_the_demo_from_metadata_alone(tmp_path: Path) -> None:
    code, out, error = _plan_cli(str(ROOT / "configs" / "demo.yaml"), "--json", cwd=tmp_path)
    assert code == 0, (out, error)
    summary = json.loads(out)
    # 64 x 256 x 256 voxels in 64 x 128 x 128 blocks; chunks 32 x 64 x 64, so 2 x 4 x 4 chunk files per output
    assert summary["blocks"] == summary["tasks"] == 4 and summary["voxels"] == 64 * 256 * 256
    for output in summary["outputs"]:
        assert (output["files_unsharded"], output["files_sharded"], output["sharded"]) == (32, 4, False)
        assert output["bytes"] >= 64 * 256 * 256  # one uint8 channel, plus its pyramid
    assert summary["resume_bytes"] > 0 and summary["estimate_s"] > 0
    assert not (tmp_path / "data").exists()  # nothing generated, nothing written


def test_plan_command_sizes_a_petabyte_described_not_read(tmp_path: Path) -> None:
    job = tmp_path / "pb.yaml"
    job.write_text(
        f"output: [zarr3://{tmp_path}/pb.zarr/p]\nblock_size: [256, 256, 256]\nshard_size: [256, 256, 256]\n"
    )
    code, out, error = _plan_cli(str(job), "--shape", "100000,100000,100000", "--workers", "100", cwd=tmp_path)
    assert code == 0, (out, error)
    assert "59,776,471 blocks of (256, 256, 256)" in out
    assert "1,911,012,500 files, in shards (256, 256, 256): 59,776,471 files" in out
    assert "on 100 cpu worker(s)" in out and "an estimate" in out
    assert not (tmp_path / "pb.zarr").exists()
    code, out, error = _plan_cli(
        str(job), "--shape", "100000,100000,100000", "--block-size", "128,256,256", cwd=tmp_path
    )
    assert isinstance(error, GeometryError) and "whole number of output shards" in str(error)
