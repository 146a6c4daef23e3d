"""Benchmark of the bookkeeping at petabyte scale: planning, files per output, scheduling no-op blocks, resume state.

Prints one table. For a simulated 1 PB volume (10^5 voxels per axis, uint8, 32x128x128 chunks): the time and
Python peak memory (tracemalloc) of building and validating the plan and addressing its last block, the number of
blocks and Dask tasks, and scale-0 files per output without and with sharding (one shard per block). Then, for
10^4 no-op blocks (10^5 and 10^6 with --large) through the real Dask scheduler (a LocalCluster of 2 worker
processes; the scheduler runs in this process) via `pipeline.execution.run_blockwise` with done-records and
tasks sized from the measured block time: blocks per second, the peak RSS of this process (client and scheduler)
during the run, the time to read back the resume state it wrote, and a re-run that skips every block. Last, a
simulated resume state of 10^8 blocks written synthetically (every block recorded, random fingerprints): the
time to list it, to read one range, and to read every range one after another as a run does.

    python benchmarks/scale.py [--large] [--workers 2] [--state-blocks 100000000]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

PETABYTE_SHAPE = (10**5, 10**5, 10**5)
CHUNKS = (32, 128, 128)
BLOCK = (256, 256, 256)


@contextmanager
def peak_rss_mb() -> Iterator[Callable[[], float]]:
    """Sample this process's resident memory every 20 ms; yields a callable giving the peak seen (MB)."""
    import psutil

    process, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak[0] / 2**20
    finally:
        stop.set()
        thread.join()


def noop(block: Any) -> None:
    """A block that does nothing: what is left is the cost of scheduling and bookkeeping."""


def plan_row() -> list[tuple[str, str]]:
    from pipeline.geometry import grid_shape
    from pipeline.plan import plan_blocks

    tracemalloc.start()
    start = time.perf_counter()
    plan = plan_blocks(PETABYTE_SHAPE, CHUNKS, BLOCK, context=(40, 92, 92), shard_shape=BLOCK)
    last = plan.block(plan.num_blocks - 1)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    chunk_files = math.prod(grid_shape(PETABYTE_SHAPE, CHUNKS))
    shard_files = math.prod(grid_shape(PETABYTE_SHAPE, BLOCK))
    return [
        ("1 PB plan: build, validate, address the last block", f"{seconds * 1e3:.2f} ms, peak {peak / 1e3:.1f} kB"),
        ("1 PB plan: blocks (= Dask tasks) of 256^3", f"{plan.num_blocks:,} (last at {last.write_roi.begin})"),
        ("1 PB output files, chunks 32x128x128 (unsharded)", f"{chunk_files:,}"),
        ("1 PB output files, shards 256^3 (sharded)", f"{shard_files:,}"),
    ]


def schedule_rows(client: Any, blocks: int, state: str) -> list[tuple[str, str]]:
    from pipeline.execution import run_blockwise
    from pipeline.plan import plan_blocks
    from pipeline.resume import BlockRecords

    plan = plan_blocks((10, 10, blocks // 100), (1, 1, 1), (1, 1, 1))
    done = BlockRecords(f"{state}/noop{blocks}", "noop")
    run: Callable[[], Any] = lambda: run_blockwise(  # noqa: E731
        client, plan, noop, done=done, progress=False, description=f"noop{blocks}", blocks_per_task=None
    )
    with peak_rss_mb() as peak:
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
    ok = "" if result.ok else f", {result.failed} failed"
    start = time.perf_counter()
    recorded = len(done.load())
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    again = run()
    again_s = time.perf_counter() - start
    name = f"{plan.num_blocks:,} no-op blocks via run_blockwise"
    return [
        (
            name,
            f"{plan.num_blocks / seconds:,.0f} blocks/s ({seconds:.1f} s{ok}); client+scheduler peak {peak():.0f} MB",
        ),
        (f"{name}: resume state", f"{recorded:,} records read back in {load_s * 1e3:.0f} ms"),
        (f"{name}: re-run", f"{again.skipped:,} skipped in {again_s:.2f} s"),
    ]


def state_rows(blocks: int, state: str) -> list[tuple[str, str]]:
    """A resume state of `blocks` recorded blocks, written directly (one merged object per range), then read."""
    from pipeline.resume import RANGE_BITS, BlockRecords, RecordRange

    records = BlockRecords(f"{state}/simulated", "job")
    rng = np.random.default_rng(0)
    size = 1 << RANGE_BITS
    ranges = (blocks + size - 1) >> RANGE_BITS
    start = time.perf_counter()
    for index in range(ranges):
        part = RecordRange.empty(index)
        count = min(size, blocks - index * size)
        part.names.append("job/cuda")
        part.jobs[:count] = 0
        part.prints[:count] = rng.integers(0, 256, (count, part.prints.shape[1]), np.uint8)
        records.write_range(part)
    write_s = time.perf_counter() - start
    size = sum(e.stat().st_size for e in os.scandir(records.location))
    os.sync()
    start = time.perf_counter()
    objects = records.objects()
    list_s = time.perf_counter() - start
    start = time.perf_counter()
    first = records.load_range(0, objects[0])
    first_s = time.perf_counter() - start
    total = len(first)
    with peak_rss_mb() as peak:
        start = time.perf_counter()
        for index in range(1, ranges):
            total += len(records.load_range(index, objects[index]))
        all_s = time.perf_counter() - start + first_s
    return [
        (
            f"{blocks:,}-block resume state (simulated)",
            f"{len(objects):,} objects, {size / 1e9:.2f} GB, written in {write_s:.0f} s",
        ),
        (f"{blocks:,}-block state: list, read first range", f"{list_s * 1e3:.0f} ms + {first_s * 1e3:.0f} ms"),
        (
            f"{blocks:,}-block state: read every range in turn",
            f"{total:,} records in {all_s:.1f} s ({total / all_s / 1e6:.0f} M records/s), peak RSS {peak():.0f} MB",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", action="store_true", help="Also 10^5 and 10^6 no-op blocks (minutes).")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (one thread each).")
    parser.add_argument("--state-blocks", type=int, default=10**8, help="Blocks of the simulated resume state.")
    parser.add_argument("--sizes", type=int, nargs="*", help="No-op run sizes instead of 10^4 (10^5, 10^6).")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    rows = plan_row()
    sizes = args.sizes or ((10**4, 10**5, 10**6) if args.large else (10**4,))
    with tempfile.TemporaryDirectory(prefix="mitoseg-scale-") as state:
        with (
            LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            for blocks in sizes:
                rows.extend(schedule_rows(client, blocks, state))
        if args.state_blocks:
            rows.extend(state_rows(args.state_blocks, state))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
