"""Training batches prepared ahead of the step, by worker processes, identical to those made in-line.

Each step's batch depends only on (seed, rank, step), so worker processes can make batches for future steps in
any order and the run stays reproducible: `data.loader_workers` changes the speed, never the batches. On a GPU
the augmentation of a batch takes longer than the step itself; the workers hide it.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from multiprocessing.pool import AsyncResult

import numpy as np

from pipeline.training.data import PatchSampler

Batch = tuple[int, np.ndarray, np.ndarray]
"""(seed of the step's torch generator, raw (B, 1, Z, Y, X) float32, label (B, Z, Y, X) uint8)."""

_worker_sampler: PatchSampler | None = None


def step_batch(sampler: PatchSampler, seed: int, rank: int, step: int, batch_size: int) -> Batch:
    """The batch of `step` on `rank`, and the seed of that step's point-sampling generator."""
    rng = np.random.default_rng([seed, rank, step])
    generator_seed = int(rng.integers(2**62))
    raw, label = sampler.batch(batch_size, rng)
    return generator_seed, raw, label


def _init_worker(sampler: PatchSampler) -> None:
    global _worker_sampler
    _worker_sampler = sampler


def _worker_batch(seed: int, rank: int, step: int, batch_size: int) -> Batch:
    assert _worker_sampler is not None
    return step_batch(_worker_sampler, seed, rank, step, batch_size)


class BatchPrefetcher:
    """Batches for consecutive steps, made by `workers` forked processes up to `depth` steps ahead.

    With 0 workers the batch is made in-line when asked for. Workers inherit the sampler (its regions in
    memory) through fork and run numpy only: a CUDA context in the parent does not reach them.
    """

    def __init__(self, sampler: PatchSampler, seed: int, rank: int, batch_size: int, workers: int) -> None:
        self.sampler, self.seed, self.rank, self.batch_size = sampler, seed, rank, batch_size
        self.depth = 2 * workers
        self.pool = (
            multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(sampler,))
            if workers
            else None
        )
        self.pending: deque[tuple[int, AsyncResult]] = deque()
        self.dropped: list[AsyncResult] = []  # made ahead for steps a jump skipped; collected at close

    def batch(self, step: int) -> Batch:
        """The batch of `step`; steps are expected in increasing order (a jump drops what was made ahead)."""
        if self.pool is None:
            return step_batch(self.sampler, self.seed, self.rank, step, self.batch_size)
        while self.pending and self.pending[0][0] != step:
            self.dropped.append(self.pending.popleft()[1])
        next_step = self.pending[-1][0] + 1 if self.pending else step
        while len(self.pending) < self.depth:
            args = (self.seed, self.rank, next_step, self.batch_size)
            self.pending.append((next_step, self.pool.apply_async(_worker_batch, args)))
            next_step += 1
        return self.pending.popleft()[1].get()

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the workers once each has handed over the batch it was making (batches made ahead are dropped).

        Terminating a pool while a worker is still writing a batch larger than the pipe's buffer deadlocks:
        the pool stops reading results and the worker never lets go of the result pipe's lock. So every batch
        asked for is collected first, then the idle workers are told to exit; `terminate` only when a batch
        does not come within `timeout_s` (a worker that died).
        """
        if self.pool is None:
            return
        outstanding = [*self.dropped, *(result for _, result in self.pending)]
        deadline = time.monotonic() + timeout_s
        for result in outstanding:
            result.wait(max(0.0, deadline - time.monotonic()))
        if all(result.ready() for result in outstanding):
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()
        self.pool, self.pending, self.dropped = None, deque(), []

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
