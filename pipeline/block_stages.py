"""A block function in three stages (read, compute, write), so that a task's blocks overlap their I/O with compute.

Workers build them (`workers.predict_block.block_stages`); `pipeline.execution` runs them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daisy import Block

from pipeline.resume import BlockRecord, Recorded


@dataclass(frozen=True)
class BlockStages:
    """A block function in three stages, so that a task of several blocks reads the next block and writes the last
    one (in one I/O thread) while it computes this one (e.g. on a GPU).

    `read(block, previous)` returns what `compute` takes; `compute` (in the task's own thread, where a Dask worker's
    state is found) returns what `write` takes, or the block's final value (a `Recorded` that is `unchanged`) when
    the block needs no write; `write` returns the block's value. Called together, they are the plain block
    function."""

    read: Callable[[Block, BlockRecord | None], Any]
    compute: Callable[[Any], Any]
    write: Callable[[Any], Any]

    def __call__(self, block: Block, previous: BlockRecord | None = None) -> Any:
        computed = self.compute(self.read(block, previous))
        return computed if is_final(computed) else self.write(computed)


def is_final(value: Any) -> bool:
    """Whether a compute stage's value already is the block's value (nothing to write)."""
    return isinstance(value, Recorded) and value.unchanged
