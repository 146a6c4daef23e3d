"""One progress reporter for long runs (blocks on Dask, training steps).

On a terminal it draws a rich bar. Elsewhere (a batch job's log, a pipe) a bar would be drawn once, at the end,
so it logs a plain line instead, at most every `interval_s` seconds and once at the end: done/total, rate, ETA.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """A duration as `h:mm:ss`."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Done/total of a run, with its rate and ETA; a context manager, advanced by `update`.

    `completed` is where a resumed run starts; the rate counts only what this run did. `terminal` (default: whether
    rich's console is one) picks the bar or the plain lines; `clock` is injectable for tests.
    """

    def __init__(
        self,
        description: str,
        total: int,
        *,
        completed: int = 0,
        unit: str = "it",
        enabled: bool = True,
        terminal: bool | None = None,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = description
        self.total = total
        self.completed = completed
        self.unit = unit
        self.enabled = enabled
        self.terminal = terminal
        self.interval_s = interval_s
        self.clock = clock
        self.info = ""
        self._start_completed = completed
        self._started = clock()
        self._last_line_at = self._started
        self._last_line: tuple[int, str] | None = None
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    @property
    def elapsed_s(self) -> float:
        """Seconds since the reporter was made."""
        return self.clock() - self._started

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        from rich import get_console

        if self.terminal if self.terminal is not None else get_console().is_terminal:
            self._bar, self._task = self._rich_bar()
            self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and self._last_line != (self.completed, self.info):
            self._write_line()

    def update(self, *, advance: int = 0, completed: int | None = None, info: str | None = None) -> None:
        """Move to `completed` (or on by `advance`) and show `info` (e.g. current loss, throughput) beside it."""
        self.completed = completed if completed is not None else self.completed + advance
        if info is not None:
            self.info = info
        if not self.enabled:
            return
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=self.completed, info=self.info)
        elif self.clock() - self._last_line_at >= self.interval_s:
            self._write_line()

    def line(self) -> str:
        """The plain progress line: done/total, percent, rate, elapsed, ETA and the info text."""
        elapsed = self.elapsed_s
        rate = (self.completed - self._start_completed) / elapsed if elapsed > 0 else 0.0
        remaining = max(self.total - self.completed, 0)
        eta = format_duration(remaining / rate) if rate > 0 else ("0:00:00" if remaining == 0 else "?")
        percent = 100 * self.completed / self.total if self.total else 100.0
        text = (
            f"{self.description} {self.completed}/{self.total} ({percent:.0f}%), {rate:.3g} {self.unit}/s, "
            f"elapsed {format_duration(elapsed)}, ETA {eta}"
        )
        return f"{text}, {self.info}" if self.info else text

    def _write_line(self) -> None:
        log.info("%s", self.line())
        self._last_line_at = self.clock()
        self._last_line = (self.completed, self.info)

    def _rich_bar(self) -> tuple[RichProgress, TaskID]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        return bar, bar.add_task(self.description, total=self.total, completed=self.completed, info=self.info)
