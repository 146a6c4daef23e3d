"""Running a block plan on Dask: bounded submission, retries, done-records, progress and a summary.

Blocks go to the cluster as independent futures, at most `max_in_flight` at a time, never as one graph
of every block. A block that fails after its retries is reported; every other block still runs.
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
from pipeline.resume import DoneMarkers

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


def _run_and_mark(fn: BlockFn, block: Block, done: DoneMarkers | None) -> Any:
    """Run one block on a worker and record it as done only after it returned."""
    result = fn(block)
    if done is not None:
        done.mark(block.block_id[1])
    return result


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


def run_blockwise(
    client: Any,
    plan: BlockPlan,
    fn: BlockFn,
    *,
    done: DoneMarkers | None = None,
    max_in_flight: int | None = None,
    retries: int = 2,
    resources: dict[str, float] | None = None,
    description: str = "blocks",
    progress: bool = True,
    keep_results: bool = False,
    completions: Callable[[], Completions] = dask_completions,
) -> RunResult:
    """Run `fn(block)` for every block of `plan` not yet recorded in `done`, on the Dask `client`.

    `fn` must be picklable and write its own output; its return value is kept only with `keep_results`
    (for small per-block summaries). Failures are collected, never raised. `completions` makes the queue that
    hands back finished futures; it comes with the client (a test's fake client brings its own).
    """
    start = time.perf_counter()
    result = RunResult(total=plan.num_blocks)
    done_ids = done.load() if done is not None else set()

    def in_flight_limit() -> int:
        """`max_in_flight`, or twice the workers present now plus two: it follows workers as they join and leave.

        Asked once per finished block, for the worker count only (no per-worker details from the scheduler)."""
        if max_in_flight is not None:
            return max_in_flight
        return 2 * max(1, int(client.scheduler_info(n_workers=0)["n_workers"])) + 2

    pending: dict[Any, Block] = {}
    queue = completions()
    blocks = plan.blocks()
    tag = done.key if done is not None else f"{time.time_ns():x}"

    def submit_next() -> bool:
        for block in blocks:
            block_id = block.block_id[1]
            if block_id in done_ids:
                result.skipped += 1
                advance(1, 0)
                continue
            future = client.submit(
                _run_and_mark,
                fn,
                block,
                done,
                key=f"{description}-{tag}-{block_id}",
                retries=retries,
                resources=resources,
                pure=False,
            )
            pending[future] = block
            queue.add(future)
            return True
        return False

    with _progress(description, plan.num_blocks, progress) as advance:
        limit = in_flight_limit()
        while len(pending) < limit and submit_next():
            pass
        for future in queue:
            block = pending.pop(future)
            block_id = block.block_id[1]
            if future.status == "finished":
                value = future.result()
                result.completed += 1
                voxels = int(block.write_roi.size)
                result.voxels += voxels
                if keep_results:
                    result.results[block_id] = value
                advance(1, voxels)
            else:
                error = future.exception()
                text = error_text(error)
                log.error("block %d (write region %s) failed: %s", block_id, roi_key(block.write_roi), text)
                result.failures.append(BlockFailure(block_id, roi_key(block.write_roi), text))
                advance(1, 0)
            future.release()
            limit = in_flight_limit()
            while len(pending) < limit and submit_next():
                pass
    result.seconds = time.perf_counter() - start
    return result
