"""Done-records (pipeline/resume.py): batches through fsspec, latest record wins, compaction, damaged batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import StorageError
from pipeline.resume import (
    COMPACT_ABOVE,
    BlockRecord,
    BlockRecords,
    DoneMarkers,
    RecordBatch,
    RecordRange,
    RecordWriter,
    fingerprint,
    segment_records,
)


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


def test_records_are_partitioned_by_block_id_range_and_read_one_range_at_a_time(tmp_path: Path) -> None:
    records = BlockRecords(str(tmp_path / "r"), "a", range_bits=3)  # ranges of 8 ids
    records.write({b: BlockRecord("a") for b in (0, 7, 8, 30)})
    objects = records.objects()
    assert sorted(objects) == [0, 1, 3] and all(len(paths) == 1 for paths in objects.values())  # one object a range
    assert np.flatnonzero(records.load_range(1).done("a")).tolist() == [0]  # id 8, the range's first
    assert len(records.load_range(2)) == 0  # a range without objects has no records
    assert records.load().done_ids("a") == {0, 7, 8, 30}
    with pytest.raises(StorageError, match="r4-RANGE-STAMP-ID.npz.*delete that file"):
        BlockRecords(str(tmp_path / "r"), "a", range_bits=4).objects()  # another range size is not read as this one


def test_fingerprints_are_eight_bytes_and_round_trip(tmp_path: Path) -> None:
    print_a = fingerprint(np.arange(10))
    assert len(bytes.fromhex(print_a)) == 8 and print_a != fingerprint(np.arange(10).astype(np.int32))
    records = BlockRecords(str(tmp_path / "r"), "a")
    records.write({5: BlockRecord("a/cpu", print_a)})
    assert records.load().get(5) == BlockRecord("a/cpu", print_a)


def test_a_run_rewrites_one_object_per_range_and_lets_finished_ranges_go(tmp_path: Path) -> None:
    records = BlockRecords(str(tmp_path / "r"), "a", range_bits=3)
    writer = RecordWriter(records, interval_s=3600)
    writer.add(RecordBatch.of({1: BlockRecord("a"), 9: BlockRecord("a")}))
    assert records.objects() == {}  # held until the interval passes or a flush
    writer.flush()
    writer.add(RecordBatch.of({2: BlockRecord("a")}))
    writer.flush()
    writer.add(RecordBatch.of({3: BlockRecord("a")}))
    writer.close(0)
    assert sorted(writer.held) == [1]  # range 0 let go, range 1 still held
    assert {i: len(p) for i, p in records.objects().items()} == {0: 1, 1: 1}  # rewritten, not one per write
    assert records.load().done_ids("a") == {1, 2, 3, 9}


def test_a_merged_range_never_hides_a_record_it_did_not_see(tmp_path: Path) -> None:
    records = BlockRecords(str(tmp_path / "r"), "a")
    records.write({5: BlockRecord("a")})  # written by another run while this range was being merged
    merged = RecordRange.empty(0)
    merged.names.append("a")
    merged.jobs[3] = 0
    records.write_range(merged, stamp=f"{2**62:020d}")  # newer, without block 5
    assert records.load().done_ids("a") == {3, 5}


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_concurrent_writers_and_merging_readers_never_lose_a_record(scheme: str, tmp_path: Path) -> None:
    import threading

    location = f"file://{tmp_path}/r" if scheme == "file" else f"memory://records-{tmp_path.name}"
    records = BlockRecords(location, "a", range_bits=8)  # 128 objects a range: merged while written
    stop = threading.Event()
    errors: list[Exception] = []

    def writer(first: int) -> None:
        for n in range(first, first + 200, 2):
            records.write({n: BlockRecord("a"), n + 1: BlockRecord("a")})

    def run(first: int) -> None:  # as a run writes: its object of a range replaced as records arrive
        held = RecordWriter(records, interval_s=0)
        for n in range(first, first + 200, 2):
            held.add(RecordBatch.of({n: BlockRecord("a"), n + 1: BlockRecord("a")}))
        held.flush()

    def reader() -> None:
        try:
            while not stop.is_set():
                for index in range(4):
                    records.load_range(index)  # merges ranges of many objects while the writers write
        except Exception as err:
            errors.append(err)

    writers = [threading.Thread(target=writer, args=(start,)) for start in (0, 200)]
    writers += [threading.Thread(target=run, args=(start,)) for start in (400, 600)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in writers + readers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert errors == []  # an object merged away by the other reader while read is found in the merged one
    assert records.load().done_ids("a") == set(range(800))
    assert records.load().done_ids("a") == set(range(800))
