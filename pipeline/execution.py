"""Running a block plan on Dask: bounded submission, retries, done-records, progress and a summary.

Blocks go to the cluster as independent futures, each carrying one or more adjacent blocks, at most
`max_in_flight` at a time, never as one graph of every block. A block that fails after its retries is reported;
every other block still runs. Done-records (`pipeline.resume`) are written by the client, in batches, for blocks
whose task returned.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from daisy import Block

from pipeline.geometry import roi_key
from pipeline.plan import BlockPlan
from pipeline.progress import Progress
from pipeline.resume import BlockRecord, BlockRecords, Recorded

log = logging.getLogger(__name__)

BlockFn = Callable[[Block], Any]


@dataclass
class BlockFailure:
    """A block that failed after all its retries."""

    block_id: int
    write_roi: str
    error: str
    unit: str = "block"
    """What failed: a block, or a unit of a later step (e.g. a foreground component's fix-up)."""


def error_text(error: BaseException) -> str:
    """One line naming an error's type and message, for failure reports."""
    return "".join(traceback.format_exception_only(type(error), error)).strip()


@dataclass
class RunResult:
    """What a blockwise run did: counts of completed, skipped and failed blocks."""

    total: int
    completed: int = 0
    skipped: int = 0
    unchanged: int = 0
    """Blocks whose worker found their record still true (same job, same input) and wrote nothing."""
    failures: list[BlockFailure] = field(default_factory=list)
    voxels: int = 0
    seconds: float = 0.0
    results: dict[int, Any] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0


class Completions(Protocol):
    """Submitted futures, handed back as each finishes (the shape of distributed's `as_completed`)."""

    def add(self, future: Any) -> None: ...

    def __iter__(self) -> Iterator[Any]: ...


def dask_completions() -> Completions:
    """An empty `distributed.as_completed` queue: the completion source for a real Dask client."""
    from distributed import as_completed

    return as_completed()


RECORD_BATCH = 256
"""Done-records buffered on the client before they are written as one object (also written each second)."""

TASK_SECONDS = 1.0
"""With `blocks_per_task=None`, tasks carry as many adjacent blocks as take about this long (measured)."""

MAX_BLOCKS_PER_TASK = 1024


@dataclass(frozen=True)
class Outcome:
    """What one block of a task did on the worker: its return value, or the error it raised after its retries."""

    block_id: int
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


def _run_blocks(
    fn: Callable[..., Any], blocks: list[Block], previous: list[BlockRecord | None], check: bool, retries: int
) -> list[Outcome]:
    """Run a task's blocks one after another on a worker, each retried on its own; one block's failure is its own.

    A checking task also hands each block its previous record (or None)."""
    outcomes = []
    for block, before in zip(blocks, previous, strict=True):
        clock = time.perf_counter()
        for attempt in range(retries + 1):
            try:
                value = fn(block, before) if check else fn(block)
            except Exception as error:
                if attempt == retries:
                    outcomes.append(Outcome(block.block_id[1], error=error_text(error)))
                    break
                log.warning("block %d failed (attempt %d), retrying: %s", block.block_id[1], attempt + 1, error)
            else:
                outcomes.append(Outcome(block.block_id[1], value, seconds=time.perf_counter() - clock))
                break
    return outcomes


@contextmanager
def _progress(description: str, total: int, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """Blocks done/total, voxels/s and ETA (`pipeline.progress`); yields an `advance(blocks, voxels)` callable."""
    with Progress(description, total, unit="blocks", enabled=enabled) as progress:
        voxel_total = 0

        def advance(blocks: int, voxels: int) -> None:
            nonlocal voxel_total
            voxel_total += voxels
            rate = voxel_total / max(progress.elapsed_s, 1e-9)
            progress.update(advance=blocks, info=f"{rate / 1e6:.3f} Mvox/s")

        yield advance


class _Records:
    """The client's side of done-records: what earlier runs recorded, and a buffer of new records to write."""

    def __init__(self, done: BlockRecords | None, resume: bool, check_on_worker: bool):
        self.done = done
        self.table = done.load() if done is not None and resume else None
        self.check_on_worker = check_on_worker
        self.done_ids = (
            self.table.done_ids(done.key)
            if self.table is not None and done is not None and not check_on_worker
            else set()
        )
        self.unwritten: dict[int, BlockRecord] = {}
        self.flushed = time.monotonic()

    def previous(self, block_id: int) -> BlockRecord | None:
        """The record a checking task gets for a block (None without one)."""
        return self.table.get(block_id) if self.table is not None and self.check_on_worker else None

    def add(self, block_id: int, value: Any) -> None:
        """Buffer a finished block's record; write the buffer when it is full or a second old."""
        if self.done is None:
            return
        if isinstance(value, Recorded):
            if value.unchanged:
                return
            self.unwritten[block_id] = value.record
        else:
            self.unwritten[block_id] = BlockRecord(self.done.key)
        if len(self.unwritten) >= RECORD_BATCH or time.monotonic() - self.flushed > 1.0:
            self.flush()

    def flush(self) -> None:
        if self.done is not None and self.unwritten:
            self.done.write(dict(self.unwritten))
            self.unwritten.clear()
        self.flushed = time.monotonic()


def run_blockwise(
    client: Any,
    plan: BlockPlan,
    fn: BlockFn,
    *,
    done: BlockRecords | None = None,
    check_on_worker: bool = False,
    resume: bool = True,
    max_in_flight: int | None = None,
    retries: int = 2,
    resources: dict[str, float] | None = None,
    description: str = "blocks",
    progress: bool = True,
    keep_results: bool = False,
    blocks_per_task: int | None = 1,
    completions: Callable[[], Completions] = dask_completions,
) -> RunResult:
    """Run `fn(block)` for every block of `plan` not yet recorded in `done` under its key, on the Dask `client`.

    `fn` must be picklable and write its own output; its return value is kept only with `keep_results`
    (for small per-block summaries). Failures are collected per block, never raised. With `check_on_worker`, no
    block is skipped here: each gets its previous record, `fn(block, previous)`, decides on the worker whether it
    still holds (e.g. the input it reads is unchanged) and returns a `Recorded`. `resume=False` ignores earlier
    records (and still writes new ones). A task carries `blocks_per_task` adjacent blocks (None: as many as take
    about `TASK_SECONDS`, from the measured block time), each retried on its own; Dask retries a task whose worker
    died. `completions` makes the queue that hands back finished futures; it comes with the client (a test's fake
    client brings its own).
    """
    start = time.perf_counter()
    result = RunResult(total=plan.num_blocks)
    records = _Records(done, resume, check_on_worker)
    pending: dict[Any, list[Block]] = {}
    queue = completions()
    blocks = plan.blocks()
    tag = f"{done.key}-{time.time_ns():x}" if done is not None else f"{time.time_ns():x}"  # unique per run
    per_task = blocks_per_task or 1
    block_seconds: list[float] = []

    def in_flight_limit() -> int:
        """`max_in_flight`, or twice the workers present now plus two: it follows workers as they join and leave.

        Asked once per finished task, for the worker count only (no per-worker details from the scheduler)."""
        if max_in_flight is not None:
            return max_in_flight
        return 2 * max(1, int(client.scheduler_info(n_workers=0)["n_workers"])) + 2

    def submit_next() -> bool:
        batch: list[Block] = []
        for block in blocks:
            if block.block_id[1] in records.done_ids:
                result.skipped += 1
                advance(1, 0)
                continue
            batch.append(block)
            if len(batch) == per_task:
                break
        if not batch:
            return False
        future = client.submit(
            _run_blocks,
            fn,
            batch,
            [records.previous(b.block_id[1]) for b in batch],
            check_on_worker,
            retries,
            key=f"{description}-{tag}-{batch[0].block_id[1]}",
            retries=retries,
            resources=resources,
            pure=False,
        )
        pending[future] = batch
        queue.add(future)
        return True

    def finish(block: Block, outcome: Outcome) -> None:
        block_id = block.block_id[1]
        if outcome.error is not None:
            log.error("block %d (write region %s) failed: %s", block_id, roi_key(block.write_roi), outcome.error)
            result.failures.append(BlockFailure(block_id, roi_key(block.write_roi), outcome.error))
            advance(1, 0)
            return
        records.add(block_id, outcome.value)
        value = outcome.value.value if isinstance(outcome.value, Recorded) else outcome.value
        voxels = 0
        if isinstance(outcome.value, Recorded) and outcome.value.unchanged:
            result.unchanged += 1
        else:
            result.completed += 1
            voxels = int(block.write_roi.size)
            result.voxels += voxels
        if keep_results:
            result.results[block_id] = value
        advance(1, voxels)

    def fill() -> None:
        limit = in_flight_limit()
        while len(pending) < limit and submit_next():
            pass

    with _progress(description, plan.num_blocks, progress) as advance:
        try:
            fill()
            for future in queue:
                batch = pending.pop(future)
                if future.status == "finished":
                    outcomes = future.result()
                else:  # the task itself failed (e.g. its worker died past the retries): each of its blocks did
                    text = error_text(future.exception())
                    outcomes = [Outcome(b.block_id[1], error=text) for b in batch]
                for block, outcome in zip(batch, outcomes, strict=True):
                    finish(block, outcome)
                future.release()
                if blocks_per_task is None:
                    block_seconds.extend(o.seconds for o in outcomes if o.error is None)
                    mean = sum(block_seconds[-256:]) / max(1, len(block_seconds[-256:]))
                    per_task = max(1, min(MAX_BLOCKS_PER_TASK, int(TASK_SECONDS / max(mean, 1e-6))))
                fill()
        finally:
            records.flush()  # also when interrupted: every block that returned keeps its record
    result.seconds = time.perf_counter() - start
    if result.unchanged:
        log.info("%s: %d of %d block(s) unchanged since they were written", description, result.unchanged, result.total)
    return result
