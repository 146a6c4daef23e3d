"""The progress reporter: off a terminal, plain lines (done/total, rate, ETA) at most every interval and at the end."""

from __future__ import annotations

import logging

import pytest

from pipeline.progress import Progress, format_duration


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]


def test_lines_come_at_most_every_interval_with_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    clock = FakeClock()
    with Progress("decode", 100, unit="blocks", terminal=False, interval_s=10, clock=clock) as progress:
        for _ in range(20):  # 2 blocks a second for 10 s: one line, when the interval is up
            clock.now += 0.5
            progress.update(advance=1)
        clock.now += 2.0
        progress.update(advance=5)  # 2 s after the last line: none
    assert _lines(caplog) == [
        "decode 20/100 (20%), 2 blocks/s, elapsed 0:00:10, ETA 0:00:40",
        "decode 25/100 (25%), 2.08 blocks/s, elapsed 0:00:12, ETA 0:00:36",  # the last line, on leaving
    ]


def test_a_resumed_run_counts_only_its_own_rate_and_shows_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    clock = FakeClock()
    with Progress("train", 1000, completed=400, unit="steps", terminal=False, interval_s=30, clock=clock) as progress:
        clock.now += 30
        progress.update(completed=460, info="loss 0.25")
    assert _lines(caplog) == ["train 460/1000 (46%), 2 steps/s, elapsed 0:00:30, ETA 0:04:30, loss 0.25"]


def test_no_progress_yet_has_no_eta_and_a_finished_run_has_zero(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    stalled = Progress("match", 8, terminal=False, clock=clock)
    clock.now += 5
    assert stalled.line() == "match 0/8 (0%), 0 it/s, elapsed 0:00:05, ETA ?"
    stalled.update(advance=8)
    assert stalled.line().endswith("ETA 0:00:00")
    assert Progress("empty", 0, terminal=False, clock=clock).line().startswith("empty 0/0 (100%)")


def test_disabled_shows_nothing_but_still_counts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    clock = FakeClock()
    with Progress("relabel", 4, enabled=False, terminal=False, interval_s=0, clock=clock) as progress:
        clock.now += 60
        progress.update(advance=4)
    assert progress.completed == 4 and _lines(caplog) == []


def test_nothing_changed_since_the_last_line_writes_no_last_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    clock = FakeClock()
    with Progress("blocks", 3, terminal=False, interval_s=1, clock=clock) as progress:
        clock.now += 1
        progress.update(advance=3)
    assert _lines(caplog) == ["blocks 3/3 (100%), 3 it/s, elapsed 0:00:01, ETA 0:00:00"]


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"), (90061, "25:01:01")]
)
def test_durations_read_as_hours_minutes_seconds(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_on_a_terminal_it_draws_a_bar_and_logs_no_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    clock = FakeClock()
    with Progress("segment", 2, terminal=True, interval_s=0, clock=clock) as progress:
        clock.now += 1
        progress.update(advance=2, info="1.000 Mvox/s")
    assert _lines(caplog) == []
