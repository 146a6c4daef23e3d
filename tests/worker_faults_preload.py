"""Dask worker preload for tests/test_slurm.py: slow blocks, or blocks whose writes fail, in worker jobs.

Worker jobs (and local workers) load it through the environment they inherit:
DASK_DISTRIBUTED__WORKER__PRELOAD='["<this file>"]', and then read
- MITOSEG_TEST_BLOCK_DELAY_S: every block first waits this many seconds. It stretches a run in wall time, not in
  CPU time, so that worker jobs end (cancelled, or at their walltime) or the run is killed while blocks are in
  flight; MITOSEG_TEST_DELAY_TARGET names the stage's per-block callable (segment's by default);
- MITOSEG_TEST_FAIL_WRITES=Z,Y,X and MITOSEG_TEST_FAULT_DIR: writes of the block at that offset always fail
  (pipeline.faults.FailWrites), so the run ends with a failed block.
"""

from __future__ import annotations

import os
import time
from typing import Any


def dask_setup(worker: Any) -> None:
    """Install the faults the environment asks for."""
    if "MITOSEG_TEST_BLOCK_DELAY_S" in os.environ:
        _delay_blocks(float(os.environ["MITOSEG_TEST_BLOCK_DELAY_S"]))
    if "MITOSEG_TEST_FAIL_WRITES" in os.environ:
        from pipeline.faults import FailWrites

        z, y, x = (int(v) for v in os.environ["MITOSEG_TEST_FAIL_WRITES"].split(","))
        FailWrites([(z, y, x)], os.environ["MITOSEG_TEST_FAULT_DIR"], always=True).setup(worker)


def _delay_blocks(seconds: float) -> None:
    """Wrap the per-block callable of a stage (MITOSEG_TEST_DELAY_TARGET, `module:callable`; segment's blocks by
    default); tasks refer to it by module and name, so they run the wrapper."""
    from pipeline.faults import PREDICT, resolve_target

    owner, name = resolve_target(os.environ.get("MITOSEG_TEST_DELAY_TARGET", PREDICT))
    original = getattr(getattr(owner, name), "__wrapped__", getattr(owner, name))

    def run(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return original(*args, **kwargs)

    run.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(owner, name, run)
