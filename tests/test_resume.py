"""Done-records (pipeline/resume.py): batches through fsspec, latest record wins, compaction, damaged batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import StorageError
from pipeline.resume import COMPACT_ABOVE, BlockRecord, BlockRecords, DoneMarkers, fingerprint, segment_records


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_done_records_round_trip(scheme: str, tmp_path: Path) -> None:
    output = f"{scheme}{tmp_path / 'out.zarr'}"
    markers = DoneMarkers(output, "job1")
    assert len(markers.load()) == 0
    markers.mark([3, 0])
    markers.mark([11])
    assert markers.load().done_ids("job1") == {0, 3, 11}
    assert len(list((tmp_path / "out.zarr.mitoseg" / "done" / "job1").glob("*.npz"))) == 2  # one object a batch
    assert len(DoneMarkers(output, "job2").load()) == 0
    markers.clear()
    assert len(markers.load()) == 0


def test_a_later_record_of_a_block_replaces_the_earlier(tmp_path: Path) -> None:
    records = BlockRecords(str(tmp_path / "r"), "a")
    print_a, print_b = fingerprint(np.zeros(3)), fingerprint(np.ones(3))
    records.write({1: BlockRecord("a", print_a), 2: BlockRecord("a", print_a)})
    records.write({2: BlockRecord("b", print_b), 7: BlockRecord("b")})
    table = records.load()
    assert table.get(1) == BlockRecord("a", print_a) and table.get(2) == BlockRecord("b", print_b)
    assert table.get(7) == BlockRecord("b") and table.get(3) is None
    assert table.done_ids("a") == {1} and table.done_ids("b") == {2, 7}


def test_many_batches_are_compacted_into_one_without_losing_a_record(tmp_path: Path) -> None:
    records = BlockRecords(str(tmp_path / "r"), "a")
    for n in range(COMPACT_ABOVE + 2):
        records.write({n: BlockRecord("a"), 0: BlockRecord(f"job {n}")})
    first = records.load()
    assert len(list((tmp_path / "r").glob("*.npz"))) == 1
    again = records.load()
    assert first.done_ids("a") == again.done_ids("a") == set(range(1, COMPACT_ABOVE + 2))
    assert again.get(0) == BlockRecord(f"job {COMPACT_ABOVE + 1}")  # the latest record of block 0 survived


def test_a_damaged_batch_is_an_error_naming_it(tmp_path: Path) -> None:
    records = BlockRecords(str(tmp_path / "r"), "a")
    records.write({1: BlockRecord("a")})
    (tmp_path / "r" / "0-broken.npz").write_bytes(b"not a batch")
    with pytest.raises(StorageError, match="0-broken.npz cannot be read.*delete that file"):
        records.load()


def test_segment_records_belong_to_the_outputs_identity(tmp_path: Path) -> None:
    out = f"file://{tmp_path}/p.zarr/probs"
    segment_records(out, ["id1"], "job").write({0: BlockRecord("job")})
    assert segment_records(out, ["id1"], "job").load().done_ids("job") == {0}
    assert len(segment_records(out, ["id2"], "job").load()) == 0  # a re-created output has a new identity


def test_concurrent_writers_never_lose_a_record(tmp_path: Path) -> None:
    import threading

    records = BlockRecords(str(tmp_path / "r"), "a")

    def writer(first: int) -> None:
        for n in range(first, first + 40, 2):
            records.write({n: BlockRecord("a"), n + 1: BlockRecord("a")})

    threads = [threading.Thread(target=writer, args=(start,)) for start in (0, 40, 80, 120)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert records.load().done_ids("a") == set(range(160))  # 80 batches, compacted on load, every record kept
    assert records.load().done_ids("a") == set(range(160))
