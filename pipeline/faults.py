"""Fault injection for mitoseg's fault suite (tests/test_faults.py) and benchmarks/faults.py.

Dask worker plugins that, inside real worker processes, kill the worker while it computes a chosen block or
make writes of chosen blocks fail, once or always. Blocks are chosen by the z,y,x offset of their write region,
which is the same in every run of a plan. "Once" is claimed through a marker file created with O_EXCL in a
directory shared by the workers, so it holds across worker restarts and across runs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable
from typing import Any

from distributed import WorkerPlugin

Offset = tuple[int, int, int]


def _claim(marker_dir: str, name: str) -> bool:
    """True the first time `name` is claimed in `marker_dir` by any process, False ever after."""
    os.makedirs(marker_dir, exist_ok=True)
    try:
        os.close(os.open(os.path.join(marker_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _name(kind: str, offset: Iterable[int]) -> str:
    return f"{kind}-" + "_".join(str(int(o)) for o in offset)


class _Fault(WorkerPlugin):
    """A fault at the blocks whose write region starts at one of `offsets`, once (per block) or `always`."""

    kind = "fault"

    def __init__(self, offsets: Iterable[Offset], marker_dir: str, always: bool = False):
        self.offsets = {tuple(int(v) for v in o) for o in offsets}
        self.marker_dir = marker_dir
        self.always = always
        self.name = f"mitoseg-{self.kind}-{abs(hash((tuple(sorted(self.offsets)), marker_dir, always))):x}"

    def fires(self, offset: Iterable[int]) -> bool:
        """Whether the fault strikes a block at `offset` now (and records that it did)."""
        key = tuple(int(v) for v in offset)
        if key not in self.offsets:
            return False
        return _claim(self.marker_dir, _name(self.kind, key)) or self.always

    def count(self) -> int:
        """How many distinct blocks this fault has struck so far (from the marker files)."""
        if not os.path.isdir(self.marker_dir):
            return 0
        return sum(name.startswith(f"{self.kind}-") for name in os.listdir(self.marker_dir))


class KillWorkerAtBlock(_Fault):
    """SIGKILLs the worker process when it starts one of the chosen blocks of a segment run."""

    kind = "kill"

    def setup(self, worker: Any) -> None:
        import workers.predict_block as module

        original: Callable[..., Any] = getattr(module.predict_block, "__wrapped__", module.predict_block)
        fault = self

        def predict_block(block: Any, *args: Any, **kwargs: Any) -> Any:
            if fault.fires(block.write_roi.offset):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(block, *args, **kwargs)

        predict_block.__wrapped__ = original  # type: ignore[attr-defined]
        module.predict_block = predict_block  # tasks pickle it by reference, so they find this one

    def teardown(self, worker: Any) -> None:
        import workers.predict_block as module

        module.predict_block = getattr(module.predict_block, "__wrapped__", module.predict_block)


class FailWrites(_Fault):
    """Makes the volume writes of the chosen blocks raise, as an unreachable or refusing storage would."""

    kind = "write"

    def setup(self, worker: Any) -> None:
        from pipeline.volumes.base import Volume

        original = getattr(Volume.write, "__wrapped__", Volume.write)
        fault = self

        def write(volume: Volume, roi: Any, data: Any) -> None:
            if fault.fires(roi.offset):
                raise OSError(f"injected storage fault writing {roi} of {volume.url}")
            original(volume, roi, data)

        write.__wrapped__ = original  # type: ignore[attr-defined]
        Volume.write = write  # type: ignore[method-assign,assignment]

    def teardown(self, worker: Any) -> None:
        from pipeline.volumes.base import Volume

        Volume.write = getattr(Volume.write, "__wrapped__", Volume.write)  # type: ignore[method-assign]
