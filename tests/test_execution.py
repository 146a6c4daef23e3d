"""run_blockwise's scheduling on a fake client that runs tasks synchronously: no cluster, fast, deterministic."""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daisy import Block

from pipeline.execution import RunResult, run_blockwise
from pipeline.plan import plan_blocks
from pipeline.resume import BlockRecord, BlockRecords, DoneMarkers, Recorded, fingerprint

PLAN = plan_blocks((5, 8, 10), (2, 4, 4), (2, 4, 4))  # a 3 x 2 x 3 grid; the last row, column and slab are clipped
ALL = set(range(18))
LAST = "4,4,8:1,4,2"  # block 17's write region (offset:shape), clipped at the volume's end on every axis


class FakeFuture:
    """A task that runs, with Dask's retries, when the completion queue reaches it."""

    def __init__(self, client: FakeClient, call: Callable[[], Any], retries: int):
        self.client, self.call, self.retries = client, call, retries
        self.status = "pending"
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        for _ in range(1 + self.retries):
            try:
                self.value, self.status = self.call(), "finished"
                return
            except Exception as err:
                self.error, self.status = err, "error"

    def result(self) -> Any:
        return self.value

    def exception(self) -> BaseException | None:
        return self.error

    def release(self) -> None:
        self.client.in_flight -= 1


class FakeCompletions:
    """Futures handed back one at a time, run on the way: oldest first, or newest first to finish out of order."""

    def __init__(self, newest_first: bool):
        self.queue: deque[FakeFuture] = deque()
        self.newest_first = newest_first

    def add(self, future: FakeFuture) -> None:
        self.queue.append(future)

    def __iter__(self) -> Iterator[FakeFuture]:
        while self.queue:
            future = self.queue.pop() if self.newest_first else self.queue.popleft()
            future.run()
            yield future


class FakeClient:
    """The part of a Dask client that run_blockwise uses, counting the futures held at once."""

    def __init__(self, workers: int = 1, newest_first: bool = False):
        self.workers, self.newest_first = workers, newest_first
        self.in_flight = self.most_in_flight = 0
        self.submitted: list[dict[str, Any]] = []

    def scheduler_info(self, n_workers: int = -1) -> dict[str, Any]:
        shown = self.workers if n_workers < 0 else min(n_workers, self.workers)
        return {"n_workers": self.workers, "workers": {f"worker-{i}": {} for i in range(shown)}}

    def submit(self, func: Callable[..., Any], *args: Any, key: str, retries: int, resources: Any, pure: bool) -> Any:
        self.submitted.append({"key": key, "retries": retries, "resources": resources, "pure": pure})
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return FakeFuture(self, lambda: func(*args), retries)

    def completions(self) -> FakeCompletions:
        return FakeCompletions(self.newest_first)


class Blocks:
    """A block function that counts its calls per block and fails a block its first `failures[id]` times."""

    def __init__(self, failures: dict[int, int] | None = None):
        self.failures = failures or {}
        self.calls: Counter[int] = Counter()

    def __call__(self, block: Block) -> int:
        block_id = block.block_id[1]
        self.calls[block_id] += 1
        if self.calls[block_id] <= self.failures.get(block_id, 0):
            raise RuntimeError(f"block {block_id} broke")
        return 10 * block_id


def run(client: FakeClient, fn: Callable[[Block], int], **kwargs: Any) -> RunResult:
    return run_blockwise(client, PLAN, fn, progress=False, completions=client.completions, **kwargs)


@pytest.mark.parametrize(("workers", "max_in_flight", "bound"), [(1, 3, 3), (1, None, 4), (3, None, 8), (2, 50, 18)])
def test_in_flight_futures_are_bounded(workers: int, max_in_flight: int | None, bound: int) -> None:
    client = FakeClient(workers)
    result = run(client, Blocks(), max_in_flight=max_in_flight)
    assert client.most_in_flight == bound  # given, else two per worker plus two; never more than the blocks
    assert client.in_flight == 0  # every future released
    assert result.completed == result.total == len(client.submitted) == 18


def test_a_failing_block_is_retried_then_reported_while_the_others_run() -> None:
    fn = Blocks({4: 2, 17: 99})  # block 4 succeeds on its last retry, block 17 never does
    result = run(FakeClient(), fn, retries=2, max_in_flight=2)
    assert fn.calls[4] == fn.calls[17] == 3 and set(fn.calls) == ALL
    assert (result.completed, result.skipped, result.failed, result.ok) == (17, 0, 1, False)
    (failure,) = result.failures
    assert (failure.block_id, failure.write_roi, failure.unit) == (17, LAST, "block")
    assert failure.error == "RuntimeError: block 17 broke"
    assert result.voxels == 5 * 8 * 10 - 1 * 4 * 2  # the failed block's voxels are not counted


def test_no_retries_means_one_attempt() -> None:
    fn = Blocks({4: 1})
    result = run(FakeClient(), fn, retries=0)
    assert fn.calls[4] == 1 and [f.block_id for f in result.failures] == [4]


def test_done_records_skip_finished_blocks_and_a_rerun_does_only_the_rest(tmp_path: Path) -> None:
    done = DoneMarkers(str(tmp_path / "out.zarr"), "job")
    done.mark([0, 5])
    DoneMarkers(str(tmp_path / "out.zarr"), "other job").mark([1])  # another job's record is not this job's
    fn = Blocks({17: 99})
    first = run(FakeClient(), fn, done=done)
    assert (first.completed, first.skipped, first.failed) == (15, 2, 1)
    assert set(fn.calls) == ALL - {0, 5}
    assert done.load().done_ids("job") == ALL - {17}  # recorded only after the block returned

    client, fn = FakeClient(), Blocks()
    second = run(client, fn, done=done)
    assert (second.completed, second.skipped, second.failed, second.ok) == (1, 17, 0, True)
    assert set(fn.calls) == {17} and len(client.submitted) == 1
    assert done.load().done_ids("job") == ALL
    assert run(FakeClient(), Blocks(), done=done, resume=False).completed == 18  # records ignored, none deleted


def test_records_are_written_in_batches_not_one_object_per_block(tmp_path: Path) -> None:
    done = DoneMarkers(str(tmp_path / "out.zarr"), "job")
    run(FakeClient(), Blocks(), done=done)
    assert len(list((tmp_path / "out.zarr.mitoseg" / "done" / "job").glob("*.npz"))) == 1  # 18 blocks, one object


class Checking:
    """A block function that checks on the worker: unchanged when its previous record holds `version`."""

    def __init__(self, version: dict[int, str]):
        self.version = version
        self.computed: list[int] = []

    def __call__(self, block: Block, previous: BlockRecord | None) -> Recorded:
        block_id = block.block_id[1]
        record = BlockRecord("job", fingerprint(np.array([self.version.get(block_id, "a")])))
        if previous == record:
            return Recorded(None, record, unchanged=True)
        self.computed.append(block_id)
        return Recorded(block_id, record)


def test_blocks_checked_on_the_worker_recompute_only_what_changed(tmp_path: Path) -> None:
    done = BlockRecords(str(tmp_path / "records"), "job")
    fn = Checking({})
    first = run(FakeClient(), fn, done=done, check_on_worker=True)
    assert (first.completed, first.unchanged, first.skipped) == (18, 0, 0) and sorted(fn.computed) == sorted(ALL)
    fn = Checking({3: "b", 11: "b"})  # the inputs of blocks 3 and 11 changed
    again = run(FakeClient(), fn, done=done, check_on_worker=True, keep_results=True)
    assert (again.completed, again.unchanged, again.skipped) == (2, 16, 0) and sorted(fn.computed) == [3, 11]
    assert again.voxels == sum(PLAN.block_at(PLAN.index_of(b)).write_roi.size for b in (3, 11))  # computed ones only
    assert again.results[3] == 3 and again.results[0] is None
    fn = Checking({3: "b", 11: "b"})
    assert run(FakeClient(), fn, done=done, check_on_worker=True).unchanged == 18 and fn.computed == []


def test_run_result_counts_voxels_and_keeps_results_by_block_when_they_finish_out_of_order() -> None:
    client = FakeClient(newest_first=True)
    result = run(client, Blocks(), keep_results=True, retries=1, resources={"GPU": 1.0})
    assert (result.total, result.completed, result.skipped, result.failed, result.ok) == (18, 18, 0, 0, True)
    assert result.voxels == 5 * 8 * 10
    assert result.results == {block_id: 10 * block_id for block_id in ALL}
    assert all(s["resources"] == {"GPU": 1.0} and s["retries"] == 1 and s["pure"] is False for s in client.submitted)
    assert len({s["key"] for s in client.submitted}) == 18  # one task key per block


def test_results_are_not_kept_unless_asked() -> None:
    assert run(FakeClient(), Blocks()).results == {}


def test_in_flight_work_follows_workers_as_they_join() -> None:
    client = FakeClient(workers=1)
    fn = Blocks()

    def joining(block: Block) -> int:
        if block.block_id[1] == 2:
            client.workers = 4  # three more workers joined while the run was going
        return fn(block)

    result = run(client, joining)
    assert result.completed == 18
    assert client.most_in_flight == 2 * 4 + 2  # not the 4 computed from the one worker at the start


class DyingClient(FakeClient):
    """A fake client whose task holding block `dies_with` always fails as a whole, as when its worker dies."""

    def __init__(self, dies_with: int):
        super().__init__()
        self.dies_with = dies_with

    def submit(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.dies_with in args[1].ids:  # the task's block ids

            def die(*_: Any) -> Any:
                raise RuntimeError("worker died")

            func = die
        return super().submit(func, *args, **kwargs)


def test_tasks_of_several_blocks_keep_per_block_retries_failures_and_records(tmp_path: Path) -> None:
    done = DoneMarkers(str(tmp_path / "out.zarr"), "job")
    client, fn = FakeClient(), Blocks({4: 2, 9: 99})
    result = run(client, fn, done=done, blocks_per_task=4, retries=2, keep_results=True)
    assert len(client.submitted) == 5  # 18 blocks, 4 a task
    assert fn.calls[4] == fn.calls[9] == 3 and set(fn.calls) == ALL  # each block retried on its own
    assert [f.block_id for f in result.failures] == [9] and result.completed == 17
    assert result.results == {b: 10 * b for b in ALL - {9}}
    assert done.load().done_ids("job") == ALL - {9}
    dying = run(DyingClient(dies_with=9), Blocks(), done=done, blocks_per_task=4)
    assert (dying.completed, dying.skipped, [f.block_id for f in dying.failures]) == (0, 17, [9])
    dying_client = DyingClient(dies_with=1)
    dead = run(dying_client, Blocks(), blocks_per_task=4)
    # the dead task's blocks go again one per task: only the block that kills its task is reported
    assert [f.block_id for f in dead.failures] == [1] and dead.completed == 17
    assert dead.failures[0].error == "RuntimeError: worker died"
    assert len(dying_client.submitted) == 5 + 4


def test_tasks_grow_to_the_measured_block_time() -> None:
    client = FakeClient()
    result = run(client, Blocks(), blocks_per_task=None)
    assert result.completed == 18 and len(client.submitted) < 18  # instant blocks: the rest go in one task


@pytest.mark.parametrize("blocks_per_task", [1, 3, None])
def test_records_in_ranges_of_ids_skip_and_check_exactly_across_ranges(tmp_path: Path, blocks_per_task: Any) -> None:
    done = BlockRecords(str(tmp_path / "done"), "job", range_bits=2)  # 18 blocks in 5 ranges of 4 ids
    fn = Blocks({9: 99})
    first = run(FakeClient(), fn, done=done, blocks_per_task=blocks_per_task)
    assert (first.completed, [f.block_id for f in first.failures]) == (17, [9])
    assert {i: len(paths) for i, paths in done.objects().items()} == dict.fromkeys(range(5), 1)  # one object a range
    client, fn = FakeClient(), Blocks()
    second = run(client, fn, done=done, blocks_per_task=blocks_per_task)
    assert (second.completed, second.skipped, set(fn.calls)) == (1, 17, {9}) and len(client.submitted) == 1

    records = BlockRecords(str(tmp_path / "records"), "job", range_bits=2)
    assert run(FakeClient(), Checking({}), done=records, check_on_worker=True, blocks_per_task=blocks_per_task).ok
    fn = Checking({3: "b", 4: "b", 17: "b"})  # the last block of range 0, the first of range 1, the very last
    again = run(FakeClient(), fn, done=records, check_on_worker=True, blocks_per_task=blocks_per_task)
    assert (again.completed, again.unchanged, sorted(fn.computed)) == (3, 15, [3, 4, 17])


class Staged:
    """Stages of a block function whose compute of block k waits (up to `wait_s`) for block k+1's read to start and
    block k-1's write to finish, within a task of `per_task` blocks, and counts when they did: only a runner that
    overlaps I/O with compute sees them."""

    def __init__(
        self,
        per_task: int,
        write_failures: dict[int, int] | None = None,
        unchanged: frozenset[int] = frozenset(),
        wait_s: float = 2.0,
    ):
        self.per_task, self.write_failures, self.unchanged = per_task, write_failures or {}, unchanged
        self.wait_s = wait_s
        self.events: dict[tuple[str, int], threading.Event] = {}
        self.writes: Counter[int] = Counter()
        self.overlapped: Counter[str] = Counter()

    def event(self, name: str, block_id: int) -> threading.Event:
        return self.events.setdefault((name, block_id), threading.Event())

    def read(self, block: Block, previous: Any) -> int:
        block_id = block.block_id[1]
        self.event("read", block_id).set()
        return block_id

    def compute(self, block_id: int) -> Any:
        row = block_id % self.per_task
        if row < self.per_task - 1 and block_id + 1 < len(ALL) and self.event("read", block_id + 1).wait(self.wait_s):
            self.overlapped["read"] += 1
        if row > 0 and self.event("written", block_id - 1).wait(self.wait_s):
            self.overlapped["write"] += 1
        if block_id in self.unchanged:
            return Recorded(0, BlockRecord("job", ""), unchanged=True)
        return block_id

    def write(self, block_id: int) -> int:
        self.writes[block_id] += 1
        if self.writes[block_id] <= self.write_failures.get(block_id, 0):
            raise OSError(f"write of block {block_id} failed")
        self.event("written", block_id).set()
        return 10 * block_id


def test_staged_blocks_read_the_next_and_write_the_last_while_one_computes(tmp_path: Path) -> None:
    from pipeline.block_stages import BlockStages

    fn = Staged(per_task=6)
    done = DoneMarkers(str(tmp_path / "out.zarr"), "job")
    stages = BlockStages(fn.read, fn.compute, fn.write)
    result = run(FakeClient(), stages, done=done, blocks_per_task=6, keep_results=True)
    assert result.ok and result.results == {b: 10 * b for b in ALL}
    # in each task of 6 blocks, 5 computes saw the next read and 5 the last write happen while they ran
    assert fn.overlapped == {"read": 3 * 5, "write": 3 * 5}
    assert done.load().done_ids("job") == ALL and set(fn.writes) == ALL


def test_staged_blocks_keep_retries_failures_and_unchanged_blocks(tmp_path: Path) -> None:
    from pipeline.block_stages import BlockStages

    fn = Staged(per_task=6, write_failures={3: 1, 7: 99}, unchanged=frozenset({5}), wait_s=0.05)
    done = DoneMarkers(str(tmp_path / "out.zarr"), "job")
    stages = BlockStages(fn.read, fn.compute, fn.write)
    result = run(FakeClient(), stages, done=done, blocks_per_task=6, retries=2, keep_results=True)
    assert [f.block_id for f in result.failures] == [7] and "write of block 7 failed" in result.failures[0].error
    assert fn.writes[3] == 2 and fn.writes[7] == 3 and fn.writes[5] == 0  # a failed write runs its block again
    assert result.unchanged == 1 and result.completed == 16
    assert done.load().done_ids("job") == ALL - {5, 7}  # unchanged: its earlier record stands; failed: none
    assert stages(PLAN.block(4)) == 40  # called whole, the stages are the plain block function
