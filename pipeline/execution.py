"""Running a block plan on Dask: bounded submission, retries, done-records, progress and a summary.

Blocks go to the cluster as independent futures, each carrying a run of adjacent block ids (the worker makes the
blocks from the plan), at most `max_in_flight` at a time, never as one graph of every block. A block that fails
after its retries is reported; every other block still runs. Done-records (`pipeline.resume`) are read one range
of ids at a time as submission reaches it, and written by the client for blocks whose task returned. The client
does a fixed amount of work per task, not per block, so tasks of many cheap blocks schedule thousands a second.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from daisy import Block

from pipeline.block_stages import BlockStages, is_final
from pipeline.geometry import roi_key
from pipeline.plan import BlockPlan
from pipeline.progress import Progress
from pipeline.resume import RANGE_BITS, BlockRecord, BlockRecords, RecordBatch, Recorded, RecordRange, RecordWriter

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


TASK_SECONDS = 1.0
"""With `blocks_per_task=None`, tasks carry as many adjacent blocks as take about this long (measured)."""

STAGED_TASK_SECONDS = 10.0
"""The same for `BlockStages`: long enough that fast (GPU) blocks travel several to a task, so their reads and
writes overlap compute."""

MAX_BLOCKS_PER_TASK = 1024


@dataclass(frozen=True)
class BlockTask:
    """One task's blocks, by id, and what its worker needs to run and record them."""

    plan: BlockPlan
    ids: np.ndarray
    retries: int
    previous: RecordBatch | None = None
    """With checking on the worker: each block's earlier record (job index -1: none)."""
    record_job: str | None = None
    """The record a block earns when `fn` returns no `Recorded` (None: the run writes no records)."""
    keep_results: bool = False


@dataclass
class TaskOutcome:
    """What a task's blocks did: failures by block id, the records earned, counts, and kept values."""

    errors: dict[int, str]
    records: RecordBatch
    completed: int = 0
    unchanged: int = 0
    voxels: int = 0
    seconds: float = 0.0
    """Time of the blocks that returned, together (sizes later tasks)."""
    values: dict[int, Any] = field(default_factory=dict)


LOST_RESUBMITS = 2
"""Times a one-block task that Dask gave back with neither a result nor an error (lost, cancelled) is sent again."""


def _one_block_tasks(task: BlockTask) -> list[BlockTask]:
    """The blocks of `task` as tasks of one block each (with each block's earlier record), last block first."""
    tasks = []
    for row in range(len(task.ids)):
        one = slice(row, row + 1)
        previous = task.previous
        if previous is not None:
            previous = RecordBatch(previous.ids[one], previous.names, previous.jobs[one], previous.prints[one])
        tasks.append(replace(task, ids=task.ids[one].copy(), previous=previous))
    return tasks[::-1]


def _previous(task: BlockTask, row: int) -> BlockRecord | None:
    if task.previous is None or task.previous.jobs[row] < 0:
        return None
    raw = task.previous.prints[row].tobytes()
    return BlockRecord(task.previous.names[task.previous.jobs[row]], raw.hex() if any(raw) else "")


def _run_task(fn: Callable[..., Any], task: BlockTask) -> TaskOutcome:
    """Run a task's blocks one after another on a worker, each retried on its own; one block's failure is its own.

    A checking task also hands each block its previous record (or None). With `BlockStages`, the next block's read
    and the last block's write overlap this block's compute; the task returns only once every write has finished.
    """
    values = _staged_values(fn, task) if isinstance(fn, BlockStages) else _plain_values(fn, task)
    errors: dict[int, str] = {}
    kept: dict[int, Any] = {}
    records: dict[int, BlockRecord] = {}
    unchanged = voxels = 0
    seconds = 0.0
    for block_id, (ok, value, took) in values.items():
        if not ok:
            errors[block_id] = value
            continue
        block = task.plan.block(block_id)
        seconds += took
        computed, record = True, BlockRecord(task.record_job) if task.record_job is not None else None
        if isinstance(value, Recorded):
            computed, record, value = not value.unchanged, value.record, value.value
        if computed:
            voxels += int(block.write_roi.size)
            if record is not None and task.record_job is not None:
                records[block_id] = record
        else:
            unchanged += 1
        if task.keep_results:
            kept[block_id] = value
    completed = len(task.ids) - len(errors) - unchanged
    return TaskOutcome(errors, RecordBatch.of(records), completed, unchanged, voxels, seconds, kept)


BlockValues = dict[int, tuple[bool, Any, float]]
"""Per block id, in task order: (returned, its value or the error text, seconds)."""


def _with_retries(fn: Callable[..., Any], task: BlockTask, row: int, attempts: int) -> Any:
    """`fn` on the task's block at `row`, tried up to `attempts` times until it returns (then the last error raises)."""
    block_id = int(task.ids[row])
    block = task.plan.block(block_id)
    for attempt in range(1, attempts + 1):
        try:
            return fn(block, _previous(task, row)) if task.previous is not None else fn(block)
        except Exception as error:
            if attempt == attempts:
                raise
            log.warning("block %d failed (attempt %d), retrying: %s", block_id, attempt, error)
    raise AssertionError("attempts must be >= 1")


def _plain_values(fn: Callable[..., Any], task: BlockTask) -> BlockValues:
    values: BlockValues = {}
    for row, block_id in enumerate(task.ids.tolist()):
        clock = time.perf_counter()
        try:
            values[block_id] = (True, _with_retries(fn, task, row, task.retries + 1), time.perf_counter() - clock)
        except Exception as error:
            values[block_id] = (False, error_text(error), 0.0)
    return values


def _staged_values(stages: BlockStages, task: BlockTask) -> BlockValues:
    """The blocks of a task through `stages`: while block k computes in this thread, the I/O thread writes block
    k-1 and reads block k+1. A block whose stage fails runs again whole, here, for its remaining retries. Each block
    that returned is given an equal share of the task's time (its stages overlap its neighbours')."""
    ids = task.ids.tolist()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    clock = time.perf_counter()

    def read(row: int) -> Any:
        block = task.plan.block(ids[row])
        return stages.read(block, _previous(task, row) if task.previous is not None else None)

    def again(row: int, error: BaseException) -> None:
        """Block `row` whole, here, after a stage of its first attempt failed with `error`."""
        if task.retries == 0:
            errors[ids[row]] = error_text(error)
            return
        log.warning("block %d failed (attempt 1), retrying: %s", ids[row], error)
        try:
            results[ids[row]] = _with_retries(stages, task, row, task.retries)
        except Exception as final:
            errors[ids[row]] = error_text(final)

    def finish_write(row: int, future: Future[Any]) -> None:
        try:
            results[ids[row]] = future.result()
        except Exception as error:
            again(row, error)

    with ThreadPoolExecutor(1, thread_name_prefix="mitoseg-io") as io:
        reading: Future[Any] | None = io.submit(read, 0) if ids else None
        writing: tuple[int, Future[Any]] | None = None
        for row in range(len(ids)):
            assert reading is not None
            try:
                first = reading.result()
                failed: BaseException | None = None
            except Exception as error:
                failed = error
            reading = io.submit(read, row + 1) if row + 1 < len(ids) else None  # queued after the last write
            if failed is not None:
                again(row, failed)
                continue
            try:
                computed = stages.compute(first)
            except Exception as error:
                again(row, error)
                continue
            if is_final(computed):
                results[ids[row]] = computed
                continue
            if writing is not None:  # at most one write in flight: the last block's, done while this one computed
                finish_write(*writing)
            writing = (row, io.submit(stages.write, computed))
        if writing is not None:
            finish_write(*writing)
    share = (time.perf_counter() - clock) / max(len(results), 1)
    return {b: (True, results[b], share) if b in results else (False, errors[b], 0.0) for b in ids}


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


@dataclass
class _Span:
    """The ids of one range still to submit, and that range's earlier records (None: none read)."""

    index: int
    ids: np.ndarray
    earlier: RecordRange | None = None
    at: int = 0
    """How many of `ids` are submitted."""


class _Records:
    """The client's side of done-records: earlier records read one range at a time, new ones written per range."""

    def __init__(self, plan: BlockPlan, done: BlockRecords | None, resume: bool, check_on_worker: bool):
        self.plan, self.done, self.check_on_worker = plan, done, check_on_worker
        self.bits = done.range_bits if done is not None else RANGE_BITS
        self.stored = done.objects() if done is not None and resume else {}
        self.writer = RecordWriter(done) if done is not None else None
        self.open: dict[int, int] = {}
        """Blocks submitted and not yet finished, per range."""
        self.reached = -1
        """The last range submission has reached: ranges before it get no new tasks."""

    def spans(self, skip: Callable[[int], None]) -> Iterator[_Span]:
        """Each range's ids to run, in order; `skip(n)` counts the blocks recorded as done under the run's key."""
        size = 1 << self.bits
        for index in range((self.plan.num_blocks + size - 1) >> self.bits):
            begin = index << self.bits
            ids = np.arange(begin, min(begin + size, self.plan.num_blocks), dtype=np.int64)
            earlier = None
            if self.done is not None and index in self.stored:
                earlier = self.done.load_range(index, self.stored.pop(index))
                if not self.check_on_worker:
                    done = earlier.done(self.done.key)[: len(ids)]
                    skip(int(np.count_nonzero(done)))
                    ids, earlier = ids[~done], None
            self.reached = index
            self.close_finished()
            yield _Span(index, ids, earlier)

    def task(self, span: _Span, ids: np.ndarray, retries: int, keep_results: bool) -> BlockTask:
        previous = None
        if self.check_on_worker:
            if span.earlier is None:
                previous = RecordBatch.absent(ids)
            else:
                at = ids - span.earlier.begin
                previous = RecordBatch(ids, list(span.earlier.names), span.earlier.jobs[at], span.earlier.prints[at])
        self.open[span.index] = self.open.get(span.index, 0) + len(ids)
        key = self.done.key if self.done is not None else None
        return BlockTask(self.plan, ids, retries, previous, key, keep_results)

    def finished(self, task: BlockTask, records: RecordBatch) -> None:
        """A task returned: hold its records, and let go of ranges that are complete."""
        if self.writer is not None and len(records.ids):
            self.writer.add(records)
        index = int(task.ids[0]) >> self.bits
        self.open[index] -= len(task.ids)
        self.close_finished()

    def close_finished(self) -> None:
        for index in [i for i, n in self.open.items() if n == 0 and i < self.reached]:
            del self.open[index]
            if self.writer is not None:
                self.writer.close(index)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()


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
    about `TASK_SECONDS`, or `STAGED_TASK_SECONDS` for `BlockStages`, from the measured block time), each retried on
    its own; Dask retries a task whose worker died.
    `completions` makes the queue that hands back finished futures; it comes with the client (a test's fake
    client brings its own).
    """
    start = time.perf_counter()
    result = RunResult(total=plan.num_blocks)
    records = _Records(plan, done, resume, check_on_worker)
    pending: dict[Any, BlockTask] = {}
    queue = completions()
    tag = f"{done.key}-{time.time_ns():x}" if done is not None else f"{time.time_ns():x}"  # unique per run
    per_task = blocks_per_task or 1
    measured = [0, 0.0]  # blocks that returned, and their seconds, over the run
    task_seconds = STAGED_TASK_SECONDS if isinstance(fn, BlockStages) else TASK_SECONDS

    def skip(count: int) -> None:
        result.skipped += count
        advance(count, 0)

    def in_flight_limit() -> int:
        """`max_in_flight`, or twice the workers present now plus two: it follows workers as they join and leave.

        Asked once per finished task, for the worker count only (no per-worker details from the scheduler)."""
        if max_in_flight is not None:
            return max_in_flight
        return 2 * max(1, int(client.scheduler_info(n_workers=0)["n_workers"])) + 2

    spans = records.spans(skip)
    span: _Span | None = None
    again: list[BlockTask] = []  # blocks of failed multi-block tasks, and lost tasks, sent again one per task
    lost: dict[int, int] = {}  # per block: how often its one-block task came back with neither result nor error

    def send(task: BlockTask, key: str) -> None:
        future = client.submit(_run_task, fn, task, key=key, retries=retries, resources=resources, pure=False)
        pending[future] = task
        queue.add(future)

    def submit_next() -> bool:
        nonlocal span
        if again:
            task = again.pop()
            block_id = int(task.ids[0])
            send(task, f"{description}-{tag}-{block_id}-alone{lost.get(block_id, 0)}")
            return True
        while span is None or span.at == len(span.ids):
            span = next(spans, None)
            if span is None:
                return False
        ids = span.ids[span.at : span.at + per_task].copy()  # not a view: logs of sent tasks keep only their ids
        span.at += len(ids)
        send(records.task(span, ids, retries, keep_results), f"{description}-{tag}-{ids[0]}")
        return True

    def finish(task: BlockTask, outcome: TaskOutcome) -> None:
        for block_id, text in outcome.errors.items():
            write_roi = roi_key(plan.block(block_id).write_roi)
            log.error("block %d (write region %s) failed: %s", block_id, write_roi, text)
            result.failures.append(BlockFailure(block_id, write_roi, text))
        records.finished(task, outcome.records)
        result.completed += outcome.completed
        result.unchanged += outcome.unchanged
        result.voxels += outcome.voxels
        result.results.update(outcome.values)
        advance(len(task.ids), outcome.voxels)
        measured[0] += len(task.ids) - len(outcome.errors)
        measured[1] += outcome.seconds

    def fill() -> None:
        limit = in_flight_limit()
        while len(pending) < limit and submit_next():
            pass

    with _progress(description, plan.num_blocks, progress) as advance:
        try:
            fill()
            for future in queue:
                task = pending.pop(future)
                if future.status == "finished":
                    outcome = future.result()
                else:  # the task itself failed (e.g. its workers died past Dask's allowed failures)
                    error = future.exception() if future.status == "error" else None
                    block_id = int(task.ids[0])
                    if len(task.ids) > 1 or (error is None and lost.get(block_id, 0) < LOST_RESUBMITS):
                        # find the block to blame: each block of the task goes again alone (a lost one-block
                        # task, with no error, goes again as it is)
                        if len(task.ids) == 1:
                            lost[block_id] = lost.get(block_id, 0) + 1
                        again.extend(_one_block_tasks(task))
                        future.release()
                        fill()
                        continue
                    text = error_text(error) if error is not None else f"its task was {future.status} by Dask"
                    outcome = TaskOutcome({block_id: text}, RecordBatch.of({}))
                finish(task, outcome)
                future.release()
                if blocks_per_task is None and measured[0]:
                    mean = measured[1] / measured[0]
                    per_task = max(1, min(MAX_BLOCKS_PER_TASK, int(task_seconds / max(mean, 1e-6))))
                fill()
        finally:
            records.flush()  # also when interrupted: every block that returned keeps its record
    result.seconds = time.perf_counter() - start
    if result.unchanged:
        log.info("%s: %d of %d block(s) unchanged since they were written", description, result.unchanged, result.total)
    return result
