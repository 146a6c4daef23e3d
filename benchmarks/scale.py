"""Benchmark of the bookkeeping at petabyte scale: planning, files per output, and scheduling no-op blocks.

Prints one table. For a simulated 1 PB volume (10^5 voxels per axis, uint8, 32x128x128 chunks): the time and
Python peak memory (tracemalloc) of building and validating the plan and addressing its last block, the number of
blocks and Dask tasks, and scale-0 files per output without and with sharding (one shard per block). Then, for
10^4 no-op blocks (10^5 and 10^6 with --large) through the real Dask scheduler (a LocalCluster of 2 worker
processes) via `pipeline.execution.run_blockwise`: blocks per second and the client's peak RSS.

    python benchmarks/scale.py [--large] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
import resource
import time
import tracemalloc
from typing import Any

PETABYTE_SHAPE = (10**5, 10**5, 10**5)
CHUNKS = (32, 128, 128)
BLOCK = (256, 256, 256)


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): tracemalloc would slow the client it measures several-fold."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def schedule_row(client: Any, blocks: int) -> tuple[str, str]:
    from pipeline.execution import run_blockwise
    from pipeline.plan import plan_blocks

    plan = plan_blocks((10, 10, blocks // 100), (1, 1, 1), (1, 1, 1))
    before = peak_rss_mb()
    start = time.perf_counter()
    result = run_blockwise(client, plan, noop, progress=False, description=f"noop{blocks}")
    seconds = time.perf_counter() - start
    ok = "" if result.ok else f", {result.failed} failed"
    return (
        f"{plan.num_blocks:,} no-op blocks via run_blockwise",
        f"{plan.num_blocks / seconds:,.0f} blocks/s ({seconds:.1f} s{ok}); client peak RSS {peak_rss_mb():.0f} MB "
        f"(+{peak_rss_mb() - before:.0f} MB during the run)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", action="store_true", help="Also 10^5 and 10^6 no-op blocks (minutes).")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (one thread each).")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    rows = plan_row()
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        for blocks in (10**4, 10**5, 10**6) if args.large else (10**4,):
            rows.append(schedule_row(client, blocks))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
