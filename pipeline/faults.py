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


PREDICT = "workers.predict_block:read_block"
"""Segment's per-block function (the first of its stages, which every block runs); other stages' are callables such
as `pipeline.viewing.pyramid:DownsampleBlock`."""


def resolve_target(target: str) -> tuple[Any, str]:
    """The object holding the attribute `target` names (`module:function` or `module:Class`) and its name; a class
    is patched at `__call__`, the per-block method of the stages' task objects."""
    import importlib

    module_name, _, name = target.partition(":")
    owner = importlib.import_module(module_name)
    found = getattr(owner, name)
    if isinstance(found, type):
        return found, "__call__"
    return owner, name


class KillWorkerAtBlock(_Fault):
    """SIGKILLs the worker process when it starts one of the chosen blocks of a stage (`target`, segment's blocks
    by default)."""

    kind = "kill"

    def __init__(self, offsets: Iterable[Offset], marker_dir: str, always: bool = False, target: str = PREDICT):
        super().__init__(offsets, marker_dir, always)
        self.target = target
        self.name = f"{self.name}-{target.rsplit(':', 1)[-1]}"

    def setup(self, worker: Any) -> None:
        owner, attribute = resolve_target(self.target)
        original: Callable[..., Any] = getattr(getattr(owner, attribute), "__wrapped__", getattr(owner, attribute))
        fault = self

        def run(*args: Any, **kwargs: Any) -> Any:
            block = next(a for a in args if hasattr(a, "write_roi"))
            if fault.fires(block.write_roi.offset):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        run.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(owner, attribute, run)  # tasks pickle functions and classes by reference, so they find this one

    def teardown(self, worker: Any) -> None:
        owner, attribute = resolve_target(self.target)
        setattr(owner, attribute, getattr(getattr(owner, attribute), "__wrapped__", getattr(owner, attribute)))


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
