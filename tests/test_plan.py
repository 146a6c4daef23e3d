"""Block plan geometry on tiny volumes with hand-computed answers."""

from __future__ import annotations

import pytest
from daisy import Roi

from pipeline.errors import GeometryError
from pipeline.plan import plan_blocks, validate_write_rois


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


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (((10, 10, 10), (4, 4, 4), (6, 8, 8), None), "not a whole number of output chunks"),
        (((10, 10, 10), (4, 4, 4), (8, 8, 8), Roi((5, 0, 0), (10, 4, 4))), "outside the volume"),
    ],
)
def test_bad_plans_are_refused(args: tuple, pattern: str) -> None:
    with pytest.raises(GeometryError, match=pattern):
        plan_blocks(*args)


def test_overlapping_or_unaligned_writes_are_refused() -> None:
    chunks, shape = (4, 4, 4), (8, 8, 8)
    assert validate_write_rois([Roi((0, 0, 0), (4, 8, 8)), Roi((4, 0, 0), (4, 8, 8))], chunks, shape) == 2
    with pytest.raises(GeometryError, match="shares output chunks"):
        validate_write_rois([Roi((0, 0, 0), (4, 8, 8)), Roi((2, 0, 0), (4, 8, 8))], chunks, shape)
    with pytest.raises(GeometryError, match="shares output chunks"):  # disjoint voxels, but one chunk
        validate_write_rois([Roi((0, 0, 0), (3, 8, 8)), Roi((3, 0, 0), (5, 8, 8))], chunks, shape)
