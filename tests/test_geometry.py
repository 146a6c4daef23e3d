"""Geometry helpers on tiny shapes with hand-computed answers: region text, whole chunks, grid walks."""

from __future__ import annotations

import numpy as np
import pytest
from daisy import Roi

from pipeline.errors import GeometryError
from pipeline.geometry import as_zyx, cell_ranges, chunk_rois, parse_roi, roi_key, whole_chunks


@pytest.mark.parametrize("text", ["1,2:3,4,5", "a,b,c:1,1,1", "0,0,0:0,5,5", "0,0,0"])
def test_parse_roi_errors(text: str) -> None:
    with pytest.raises(GeometryError, match="OFFSET:SHAPE|offsets"):
        parse_roi(text)


def test_parse_roi() -> None:
    assert parse_roi("1,2,3:4,5,6") == Roi((1, 2, 3), (4, 5, 6))


def test_roi_key_is_the_text_parse_roi_reads() -> None:
    assert roi_key(Roi((1, 2, 3), (4, 5, 6))) == "1,2,3:4,5,6"
    assert parse_roi(roi_key(Roi((0, 7, 9), (2, 1, 3)))) == Roi((0, 7, 9), (2, 1, 3))


@pytest.mark.parametrize(
    ("target", "chunks", "expected"),
    [
        ((64, 256, 256), (32, 128, 128), (64, 256, 256)),  # already whole chunks
        ((64, 128, 128), (24, 50, 200), (72, 150, 200)),  # 2.67 -> 3, 2.56 -> 3, 0.64 -> 1 chunks
        ((10, 10, 10), (32, 8, 7), (32, 8, 7)),  # at least one chunk; 1.25 -> 1, 1.43 -> 1
    ],
)
def test_whole_chunks_rounds_to_the_nearest_number_of_chunks(
    target: tuple[int, int, int], chunks: tuple[int, int, int], expected: tuple[int, int, int]
) -> None:
    assert whole_chunks(target, chunks) == expected


def test_cell_ranges_are_the_grid_cells_that_meet_a_region() -> None:
    # z 1..7 meets cells 0 and 1 of 4; y 3..5 meets cell 1 of 3; x 0..8 meets cells 0 and 1 of 4
    assert cell_ranges(Roi((1, 3, 0), (6, 2, 8)), (4, 3, 4)) == (range(0, 2), range(1, 2), range(0, 2))


def test_chunk_rois_tile_a_region_once_along_the_chunk_grid() -> None:
    region = Roi((1, 2, 0), (6, 5, 7))
    parts = list(chunk_rois(region, (4, 3, 4)))
    covered = np.zeros((8, 9, 9), int)
    for part in parts:
        assert region.contains(part)
        assert all(b // c == (e - 1) // c for b, e, c in zip(part.begin, part.end, (4, 3, 4), strict=True))
        covered[part.to_slices()] += 1
    expected = np.zeros_like(covered)
    expected[region.to_slices()] = 1
    np.testing.assert_array_equal(covered, expected)


def test_chunk_rois_clipped_to_another_region_are_whole_chunks_inside_it() -> None:
    volume = Roi((0, 0, 0), (6, 6, 6))
    parts = list(chunk_rois(Roi((3, 1, 1), (1, 1, 4)), (4, 4, 4), within=volume))
    assert parts == [Roi((0, 0, 0), (4, 4, 4)), Roi((0, 0, 4), (4, 4, 2))]


def test_as_zyx() -> None:
    assert as_zyx(["1", 2, 3.0], "offset") == (1, 2, 3)
    with pytest.raises(GeometryError, match="offset must be three integers"):
        as_zyx([1, 2], "offset")
    with pytest.raises(GeometryError, match="offset must be three integers"):
        as_zyx(None, "offset")
