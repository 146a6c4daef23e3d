"""Done-records of written blocks, so that a re-run computes only the blocks that are missing or changed.

Records belong to the output they describe: segment keeps them under `<output>.mitoseg/segment/<identity>/`,
where the identity comes from run-unique ids stored in the outputs' own metadata when they are created, so the
records of an output that was deleted, re-created or replaced are never found. A record says which computation
wrote the block (the job key and the worker's device class) and, for segment, a fingerprint of the input region
the block read, context included; a block is reused only while both still hold.

Records are partitioned by block id: each object holds records of one range of 2^16 consecutive ids
(its name says which), so a run lists the folder once and then reads one range at a time as its submission
reaches it, holding only the ranges in flight; a 10^8-block state is ~1,500 ranges of 10 bytes a block. The
client writes records only for blocks whose task returned, that is after their data was written: a run keeps one
object per range, replaced by a new object with all of them as its records grow. Objects are written whole under
unique names and never rewritten, so concurrent writers and readers never lose a record; a later object's record
of a block replaces an earlier one's; a range of many objects is merged into one when read. Storage goes through
fsspec (`pipeline.storage`), the same storage as the volumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import StorageError
from pipeline.storage import filesystem

OUTPUT_FORMAT = 2
"""Bump when a change to mitoseg changes the bytes a job writes: records written by older versions are not reused."""

RANGE_BITS = 16
"""Ranges hold 2^RANGE_BITS consecutive block ids (a range is read whole: ~0.6 MB held while in flight)."""

COMPACT_ABOVE = 64
"""Objects of one range beyond which reading merges them into one (so reading a range stays a few reads)."""

FINGERPRINT_BYTES = 8
RECORD_BYTES = 2 + FINGERPRINT_BYTES
"""Stored bytes per block once a range is merged: a job index and the input fingerprint."""

_NAME = re.compile(r"r(?P<bits>\d+)-(?P<range>\d+)-(?P<stamp>\d+)-[0-9a-f]+\.npz")


def job_key(**parts: Any) -> str:
    """A short stable hash of the parts that define a job's output."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_location(output_location: str) -> str:
    """Where mitoseg keeps its run state for an output (beside it, so it travels with it)."""
    return output_location.rstrip("/") + ".mitoseg"


def new_output_id() -> str:
    """A run-unique identity for a newly created output, stored in its metadata."""
    return uuid.uuid4().hex


def fingerprint(data: np.ndarray) -> str:
    """A 64-bit hash of an array's shape, type and values (the input region a block read), as hex.

    It is only ever compared with the same block's earlier fingerprint, so 64 bits make a miss negligible."""
    digest = hashlib.blake2b(digest_size=FINGERPRINT_BYTES)
    digest.update(f"{data.shape}{data.dtype.str}".encode())
    digest.update(np.ascontiguousarray(data).data)
    return digest.hexdigest()


@dataclass(frozen=True)
class BlockRecord:
    """What wrote a block: the computation (job key, plus device class for a network) and its input's fingerprint."""

    job: str
    fingerprint: str = ""


@dataclass
class RecordBatch:
    """Records of some blocks as arrays: ids, an index into `names` per block, and 8-byte fingerprints."""

    ids: np.ndarray
    names: list[str]
    jobs: np.ndarray
    prints: np.ndarray

    @classmethod
    def of(cls, records: Mapping[int, BlockRecord]) -> RecordBatch:
        names = sorted({r.job for r in records.values()})
        index = {name: n for n, name in enumerate(names)}
        prints = np.zeros((len(records), FINGERPRINT_BYTES), np.uint8)
        for row, record in enumerate(records.values()):
            if record.fingerprint:
                prints[row] = np.frombuffer(bytes.fromhex(record.fingerprint), np.uint8)
        jobs = np.array([index[r.job] for r in records.values()], np.int16)
        return cls(np.fromiter(records, np.int64, len(records)), names, jobs, prints)

    @classmethod
    def absent(cls, ids: np.ndarray) -> RecordBatch:
        """No record for any of `ids`."""
        return cls(ids, [], np.full(len(ids), -1, np.int16), np.zeros((len(ids), FINGERPRINT_BYTES), np.uint8))

    @classmethod
    def concat(cls, batches: list[RecordBatch]) -> RecordBatch:
        """One batch of several, in order (a later batch's record of a block wins when applied)."""
        names = sorted({n for b in batches for n in b.names})
        index = {name: n for n, name in enumerate(names)}
        jobs = [np.array([index[n] for n in b.names], np.int16)[b.jobs] for b in batches]
        return cls(
            np.concatenate([b.ids for b in batches]),
            names,
            np.concatenate(jobs) if jobs else np.zeros(0, np.int16),
            np.concatenate([b.prints for b in batches]) if batches else np.zeros((0, FINGERPRINT_BYTES), np.uint8),
        )


class RecordRange:
    """The latest record of every block of one range of ids, as dense arrays (job index -1: no record)."""

    def __init__(self, index: int, names: list[str], jobs: np.ndarray, prints: np.ndarray):
        self.index, self.begin = index, index * len(jobs)
        self.names, self.jobs, self.prints = names, jobs, prints

    @classmethod
    def empty(cls, index: int, bits: int = RANGE_BITS) -> RecordRange:
        size = 1 << bits
        return cls(index, [], np.full(size, -1, np.int16), np.zeros((size, FINGERPRINT_BYTES), np.uint8))

    def __len__(self) -> int:
        return int(np.count_nonzero(self.jobs >= 0))

    def apply(self, batch: RecordBatch) -> None:
        """Take a batch's records: they replace earlier ones of the same blocks."""
        known = {name: n for n, name in enumerate(self.names)}
        for name in batch.names:
            if name not in known:
                known[name] = len(self.names)
                self.names.append(name)
        remap = np.array([known[n] for n in batch.names] or [0], np.int16)
        held = batch.jobs >= 0  # a merged object's blocks without a record never hide another object's record
        at = (batch.ids - self.begin)[held]
        self.jobs[at] = remap[batch.jobs[held]]
        self.prints[at] = batch.prints[held]

    def get(self, block_id: int) -> BlockRecord | None:
        """The latest record of `block_id`, or None."""
        job = int(self.jobs[block_id - self.begin])
        if job < 0:
            return None
        raw = self.prints[block_id - self.begin].tobytes()
        return BlockRecord(self.names[job], raw.hex() if any(raw) else "")

    def done(self, job: str) -> np.ndarray:
        """Whether each block of the range has a record naming `job` (a boolean per id)."""
        if job not in self.names:
            return np.zeros(len(self.jobs), bool)
        return self.jobs == self.names.index(job)

    def batch(self) -> RecordBatch:
        """The records held, as a dense batch from the range's first id (ids are not stored)."""
        return RecordBatch(np.zeros(0, np.int64), self.names, self.jobs, self.prints)


class RecordTable:
    """Every range of a state, read whole: for small states and tests (a run reads one range at a time)."""

    def __init__(self, ranges: Mapping[int, RecordRange], bits: int = RANGE_BITS):
        self.ranges, self.bits = dict(ranges), bits

    def __len__(self) -> int:
        return sum(len(r) for r in self.ranges.values())

    def get(self, block_id: int) -> BlockRecord | None:
        """The latest record of `block_id`, or None."""
        part = self.ranges.get(block_id >> self.bits)
        return part.get(block_id) if part is not None else None

    def done_ids(self, job: str) -> set[int]:
        """Ids of the blocks whose record names `job`."""
        return {int(i) + r.begin for r in self.ranges.values() for i in np.flatnonzero(r.done(job))}


def _encode(batch: RecordBatch, dense: bool) -> bytes:
    buffer = io.BytesIO()
    names = np.array(batch.names, dtype=str)
    if dense:  # the ids are the range's, in order
        np.savez(buffer, names=names, jobs=batch.jobs, prints=batch.prints)
    else:
        np.savez(buffer, names=names, jobs=batch.jobs, prints=batch.prints, ids=batch.ids)
    return buffer.getvalue()


class BlockRecords:
    """The records of one set of blocks (a job's, or an output identity's), stored as range objects at `location`."""

    def __init__(self, location: str, key: str, range_bits: int = RANGE_BITS):
        self.location = location.rstrip("/")
        self.key = key
        """The job key this run writes its records under (client-side skipping matches it)."""
        self.range_bits = range_bits
        """Each object holds records of ids in one range of 2^range_bits (ids >> range_bits is its index)."""

    def objects(self) -> dict[int, list[str]]:
        """The stored objects of each range that has any, oldest first: one listing of the folder."""
        fs, root = filesystem(self.location)
        try:
            names = [str(p) for p in fs.ls(root, detail=False)] if fs.exists(root) else []
        except Exception as err:
            raise StorageError(f"cannot list done-records at {self.location}: {err}") from err
        found: dict[int, list[tuple[int, str]]] = {}
        for path in names:
            name = path.rsplit("/", 1)[-1]
            if not name.endswith(".npz"):
                continue  # a write in progress (`.partial`), or not ours
            match = _NAME.fullmatch(name)
            if match is None or int(match["bits"]) != self.range_bits:
                raise StorageError(
                    f"done-record object {path} cannot be read: its name is not r{self.range_bits}-RANGE-STAMP-ID.npz "
                    "(written by another mitoseg version?); delete that file (its blocks are then recomputed)"
                )
            found.setdefault(int(match["range"]), []).append((int(match["stamp"]), path))
        return {index: [p for _, p in sorted(paths)] for index, paths in found.items()}

    def load_range(self, index: int, paths: list[str] | None = None, attempts: int = 8) -> RecordRange:
        """Range `index`'s latest records (from `paths`, else from a listing); merges its objects when many.

        An object that vanished while it was read was replaced by its writer or merged by another reader into a
        newer one: list again (after a growing pause) and read the range anew, in order."""
        fs, _ = filesystem(self.location)
        for attempt in range(attempts):
            if attempt:
                time.sleep(0.01 * 2**attempt)
            listed = self.objects().get(index, []) if paths is None else paths
            part = RecordRange.empty(index, self.range_bits)
            try:
                for path in listed:
                    part.apply(self._read(fs, path, part.begin))
            except FileNotFoundError:
                paths = None
                continue
            if len(listed) > COMPACT_ABOVE:
                newest = _NAME.fullmatch(listed[-1].rsplit("/", 1)[-1])
                self.write_range(part, stamp=newest["stamp"] if newest else None)
                self.remove(listed)  # only after the merged object is stored
            return part
        raise StorageError(f"done-records of range {index} at {self.location} kept vanishing while read; run again")

    def load(self) -> RecordTable:
        """Every range's latest records (small states and tests; a run reads ranges one at a time)."""
        ranges = {index: self.load_range(index, paths) for index, paths in self.objects().items()}
        return RecordTable(ranges, self.range_bits)

    def _read(self, fs: Any, path: str, begin: int) -> RecordBatch:
        try:
            with fs.open(path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            raise
        except Exception as err:
            raise StorageError(f"cannot read done-record object {path}: {err}") from err
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                jobs, prints = data["jobs"], data["prints"]
                ids = data["ids"] if "ids" in data else np.arange(begin, begin + len(jobs), dtype=np.int64)
                return RecordBatch(ids, [str(n) for n in data["names"]], jobs, prints)
        except Exception as err:
            raise StorageError(
                f"done-record object {path} cannot be read: {err}; delete that file (its blocks are then recomputed)"
            ) from err

    def write(self, records: Mapping[int, BlockRecord]) -> None:
        """Store records as new objects, one per range they touch."""
        if records:
            self.write_batch(RecordBatch.of(records))

    def write_range(self, part: RecordRange, stamp: str | None = None) -> str:
        """Store a whole range as one new object (10 bytes a block); `stamp` orders it among the others."""
        return self._put(part.index, part.batch(), dense=True, stamp=stamp)

    def write_batch(self, batch: RecordBatch) -> dict[int, str]:
        """Store a batch as one new object per range it touches; returns each range's object."""
        ranges = batch.ids >> self.range_bits
        written = {}
        for index in np.unique(ranges).tolist():
            mask = ranges == index
            part = RecordBatch(batch.ids[mask], batch.names, batch.jobs[mask], batch.prints[mask])
            written[index] = self._put(index, part, dense=False)
        return written

    def remove(self, paths: Iterable[str]) -> None:
        """Delete objects whose records a newer object holds (one already gone was merged by a reader)."""
        fs, _ = filesystem(self.location)
        for path in paths:
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass
            except Exception as err:
                raise StorageError(f"cannot delete done-record object {path}: {err}") from err

    def _put(self, index: int, batch: RecordBatch, dense: bool, stamp: str | None = None) -> str:
        fs, root = filesystem(self.location)
        path = f"{root}/r{self.range_bits}-{index:08d}-{stamp or f'{time.time_ns():020d}'}-{uuid.uuid4().hex[:8]}.npz"
        try:
            fs.makedirs(root, exist_ok=True)
            local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
            target = f"{path}.partial" if local else path
            with fs.open(target, "wb") as handle:
                handle.write(_encode(batch, dense))
            if local:
                fs.mv(target, path)
        except Exception as err:
            raise StorageError(f"cannot write done-records at {self.location}: {err}") from err
        return path

    def clear(self) -> None:
        """Forget every record here (a run that starts over)."""
        fs, root = filesystem(self.location)
        try:
            if fs.exists(root):
                fs.rm(root, recursive=True)
        except Exception as err:
            raise StorageError(f"cannot delete done-records at {self.location}: {err}") from err


class RecordWriter:
    """A run's new records: one object per range, replaced (at most once a second) by one holding all of them, and
    forgotten once the run has finished every block of that range, so memory follows the ranges in flight."""

    def __init__(self, records: BlockRecords, interval_s: float = 1.0):
        self.records, self.interval_s = records, interval_s
        self.held: dict[int, list[RecordBatch]] = {}
        self.stored: dict[int, str] = {}
        self.dirty: set[int] = set()
        self.flushed = time.monotonic()

    def add(self, batch: RecordBatch) -> None:
        """Hold a task's records; write the ranges that changed when the last write is `interval_s` old."""
        ranges = batch.ids >> self.records.range_bits
        for index in np.unique(ranges).tolist():
            mask = ranges == index
            self.held.setdefault(index, []).append(
                RecordBatch(batch.ids[mask], batch.names, batch.jobs[mask], batch.prints[mask])
            )
            self.dirty.add(index)
        if time.monotonic() - self.flushed >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        """Write every range that got records since its last write."""
        for index in sorted(self.dirty):
            self._write(index)
        self.dirty.clear()
        self.flushed = time.monotonic()

    def close(self, index: int) -> None:
        """Range `index` gets no more records from this run: write it if needed and let it go."""
        if index in self.dirty:
            self._write(index)
            self.dirty.discard(index)
        self.held.pop(index, None)
        self.stored.pop(index, None)

    def _write(self, index: int) -> None:
        merged = RecordBatch.concat(self.held[index])
        self.held[index] = [merged]
        before = self.stored.get(index)
        self.stored[index] = self.records.write_batch(merged)[index]
        if before is not None:
            self.records.remove([before])


class DoneMarkers(BlockRecords):
    """The done blocks of one job of a later stage (pyramid, instances), under `<output>.mitoseg/done/<key>/`."""

    def __init__(self, output_location: str, key: str):
        super().__init__(f"{state_location(output_location)}/done/{key}", key)

    def mark(self, block_ids: Iterable[int]) -> None:
        """Record blocks as done (call only after their data is written)."""
        self.write({int(b): BlockRecord(self.key) for b in block_ids})


def segment_records(output_location: str, output_ids: Iterable[str], key: str) -> BlockRecords:
    """The records of the outputs with these identities (under the first output's state), for job `key`."""
    identity = hashlib.sha256(",".join(output_ids).encode()).hexdigest()[:16]
    return BlockRecords(f"{state_location(output_location)}/segment/{identity}", key)


@dataclass(frozen=True)
class Recorded:
    """A block task's value with the record it earned; `unchanged` when its earlier record still held (no write)."""

    value: Any
    record: BlockRecord
    unchanged: bool = False
