"""Done-records of written blocks, so that a re-run computes only the blocks that are missing or changed.

Records belong to the output they describe: segment keeps them under `<output>.mitoseg/segment/<identity>/`,
where the identity comes from run-unique ids stored in the outputs' own metadata when they are created, so the
records of an output that was deleted, re-created or replaced are never found. A record says which computation
wrote the block (the job key and the worker's device class) and, for segment, a fingerprint of the input region
the block read, context included; a block is reused only while both still hold.

The client writes records in batches, one small object per batch (never one per block), and only for blocks whose
task returned, that is after their data was written. Objects have unique names, so concurrent writers never lose a
record; a later object's record of a block replaces an earlier one's. Storage goes through fsspec
(`pipeline.storage`), the same storage as the volumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import StorageError
from pipeline.storage import filesystem

OUTPUT_FORMAT = 1
"""Bump when a change to mitoseg changes the bytes a job writes: records written by older versions are not reused."""

COMPACT_ABOVE = 64
"""Batch objects beyond which loading merges them into one (so loading stays a few reads)."""


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
    """A 128-bit hash of an array's shape, type and values (the input region a block read)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{data.shape}{data.dtype.str}".encode())
    digest.update(np.ascontiguousarray(data).data)
    return digest.hexdigest()


@dataclass(frozen=True)
class BlockRecord:
    """What wrote a block: the computation (job key, plus device class for a network) and its input's fingerprint."""

    job: str
    fingerprint: str = ""


class RecordTable:
    """Loaded records, one per block id, held as sorted arrays (about 30 bytes a block, not a dict of objects)."""

    def __init__(self, ids: np.ndarray, jobs: np.ndarray, job_names: list[str], prints: np.ndarray):
        self.ids, self.jobs, self.job_names, self.prints = ids, jobs, job_names, prints

    @classmethod
    def empty(cls) -> RecordTable:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), [], np.zeros((0, 16), np.uint8))

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, block_id: int) -> BlockRecord | None:
        """The latest record of `block_id`, or None."""
        at = int(np.searchsorted(self.ids, block_id))
        if at == len(self.ids) or self.ids[at] != block_id:
            return None
        raw = self.prints[at].tobytes()
        return BlockRecord(self.job_names[self.jobs[at]], raw.hex() if any(raw) else "")

    def done_ids(self, job: str) -> set[int]:
        """Ids of the blocks whose record names `job`."""
        if job not in self.job_names:
            return set()
        return {int(i) for i in self.ids[self.jobs == self.job_names.index(job)]}


def _table(records: Mapping[int, BlockRecord]) -> RecordTable:
    """A table of a batch of records (unsorted: only ever saved)."""
    names = sorted({r.job for r in records.values()})
    index = {name: n for n, name in enumerate(names)}
    ids = np.fromiter(records, np.int64, len(records))
    jobs = np.array([index[r.job] for r in records.values()], np.int32)
    prints = np.zeros((len(records), 16), np.uint8)
    for row, record in enumerate(records.values()):
        if record.fingerprint:
            prints[row] = np.frombuffer(bytes.fromhex(record.fingerprint), np.uint8)
    return RecordTable(ids, jobs, names, prints)


def _encode(table: RecordTable) -> bytes:
    buffer = io.BytesIO()
    names = np.array(table.job_names, dtype=str)
    np.savez(buffer, ids=table.ids, jobs=table.jobs, names=names, prints=table.prints)
    return buffer.getvalue()


def _merge(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> RecordTable:
    """One table from batches in write order: a later batch's record of a block wins."""
    if not parts:
        return RecordTable.empty()
    names = sorted({str(n) for _, _, batch_names, _ in parts for n in batch_names})
    index = {name: n for n, name in enumerate(names)}
    ids = np.concatenate([p[0] for p in parts])
    jobs = np.concatenate([np.array([index[str(n)] for n in p[2]], np.int32)[p[1]] for p in parts])
    prints = np.concatenate([p[3] for p in parts])
    # the last occurrence of each id: unique over the reversed arrays keeps the first there
    _, first = np.unique(ids[::-1], return_index=True)
    keep = len(ids) - 1 - first
    order = np.argsort(ids[keep], kind="stable")
    keep = keep[order]
    return RecordTable(ids[keep], jobs[keep].astype(np.int32), names, prints[keep])


class BlockRecords:
    """The records of one set of blocks (a job's, or an output identity's), stored as batch objects at `location`."""

    def __init__(self, location: str, key: str):
        self.location = location.rstrip("/")
        self.key = key
        """The job key this run writes its records under (client-side skipping matches it)."""

    def _fs(self) -> tuple[Any, str]:
        return filesystem(self.location)

    def _batches(self) -> list[str]:
        fs, root = self._fs()
        try:
            if not fs.exists(root):
                return []
            names = [p for p in fs.ls(root, detail=False) if str(p).endswith(".npz")]
        except Exception as err:
            raise StorageError(f"cannot list done-records at {self.location}: {err}") from err
        return sorted(names, key=lambda p: str(p).rsplit("/", 1)[-1])

    def _read(self, fs: Any, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        try:
            with fs.open(path, "rb") as handle, np.load(io.BytesIO(handle.read()), allow_pickle=False) as batch:
                return batch["ids"], batch["jobs"], batch["names"], batch["prints"]
        except Exception as err:
            raise StorageError(
                f"done-record batch {path} cannot be read: {err}; delete that file (its blocks are then recomputed)"
            ) from err

    def load(self) -> RecordTable:
        """Every block's latest record; merges the batch objects into one when there are many."""
        fs, _ = self._fs()
        paths = self._batches()
        table = _merge([self._read(fs, p) for p in paths])
        if len(paths) > COMPACT_ABOVE:
            newest = str(paths[-1]).rsplit("/", 1)[-1].split("-", 1)[0]
            self._put(table, stamp=newest)  # sorts where the newest batch did, so later writers still win
            for path in paths:
                fs.rm(path)
        return table

    def write(self, records: Mapping[int, BlockRecord]) -> None:
        """Store a batch of records as one new object (written whole, then moved into place on local disk)."""
        if records:
            self._put(_table(records))

    def _put(self, table: RecordTable, stamp: str | None = None) -> None:
        fs, root = self._fs()
        name = f"{stamp or f'{time.time_ns():020d}'}-{uuid.uuid4().hex[:8]}.npz"
        path = f"{root}/{name}"
        try:
            fs.makedirs(root, exist_ok=True)
            local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
            target = f"{path}.partial" if local else path
            with fs.open(target, "wb") as handle:
                handle.write(_encode(table))
            if local:
                fs.mv(target, path)
        except Exception as err:
            raise StorageError(f"cannot write done-records at {self.location}: {err}") from err

    def clear(self) -> None:
        """Forget every record here (a run that starts over)."""
        fs, root = self._fs()
        try:
            if fs.exists(root):
                fs.rm(root, recursive=True)
        except Exception as err:
            raise StorageError(f"cannot delete done-records at {self.location}: {err}") from err


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
