"""Leases: one writer per output across real processes; abandoned leases are taken over, --force breaks one."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_s3 import S3Server, s3  # noqa: F401  (the S3 server fixture)

from pipeline.errors import LeaseHeldError, StorageError
from pipeline.lease import Lease, hold_leases

HOLD = """
import sys, time
from pipeline.lease import Lease
lease = Lease(sys.argv[1], heartbeat_s=float(sys.argv[2]))
try:
    lease.acquire()
except Exception as err:
    print("refused", type(err).__name__, err, flush=True)
    sys.exit(0)
print("held", flush=True)
sys.stdin.read()  # hold until the test closes stdin
lease.release()
print("lost" if lease.lost else "released", flush=True)
"""


def holder(location: str, heartbeat_s: float = 30.0) -> subprocess.Popen:
    """A separate process that takes the lease of `location` and holds it until its stdin closes."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, location, str(heartbeat_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def first_line(process: subprocess.Popen) -> str:
    assert process.stdout is not None
    return process.stdout.readline().strip()


def finish(process: subprocess.Popen) -> str:
    """Close the holder's stdin and return the rest of what it printed."""
    out, _ = process.communicate("", timeout=60)
    return out.strip()


@pytest.fixture
def output(tmp_path: Path) -> str:
    return f"file://{tmp_path}/out.zarr/probs"


def test_a_second_process_is_refused_naming_the_holder_and_gets_it_after_release(output: str) -> None:
    first = holder(output)
    try:
        assert first_line(first) == "held"
        with pytest.raises(LeaseHeldError) as refused:
            Lease(output).acquire()
        message = str(refused.value)
        assert f"host {socket.gethostname()}, pid {first.pid}, since " in message and "--force" in message
        assert output in message
    finally:
        assert finish(first) == "released"
    with Lease(output) as lease:
        assert lease.holder().pid == os.getpid()  # type: ignore[union-attr]
    assert lease.holder() is None


def race(output: str, racers: int = 4) -> list[str]:
    """What each of `racers` processes that try to take the lease at once says first."""
    started = [holder(output) for _ in range(racers)]
    try:
        return [first_line(p) for p in started]
    finally:
        for p in started:
            finish(p)


def test_only_one_of_several_simultaneous_processes_wins(output: str) -> None:
    answers = race(output)
    assert answers.count("held") == 1, answers
    assert all(a.startswith("refused LeaseHeldError") for a in answers if a != "held")


def test_only_one_of_several_processes_takes_over_an_abandoned_lease(tmp_path: Path, output: str) -> None:
    lease = tmp_path / "out.zarr" / "probs.mitoseg" / "lease.json"
    lease.parent.mkdir(parents=True)
    then = time.time() - 1000
    lease.write_text(json.dumps({"owner": "dead", "host": "gone", "pid": 1, "started": then, "heartbeat": then}))
    answers = race(output)
    assert answers.count("held") == 1, answers
    assert not list(lease.parent.glob("*takeover*"))


def test_the_lease_of_a_killed_process_on_this_host_is_taken_over_at_once(
    output: str, caplog: pytest.LogCaptureFixture
) -> None:
    dead = holder(output)
    assert first_line(dead) == "held"
    os.kill(dead.pid, signal.SIGKILL)
    dead.communicate(timeout=60)
    with caplog.at_level(logging.WARNING, logger="pipeline.lease"), Lease(output) as lease:
        assert lease.holder().owner == lease.owner  # type: ignore[union-attr]
    assert f"pid {dead.pid}" in caplog.text and "no longer runs on this host" in caplog.text


def test_a_lease_from_another_host_is_taken_over_only_after_its_heartbeat_stopped(
    tmp_path: Path, output: str, caplog: pytest.LogCaptureFixture
) -> None:
    lease = tmp_path / "out.zarr" / "probs.mitoseg" / "lease.json"
    lease.parent.mkdir(parents=True)
    now = time.time()
    lease.write_text(json.dumps({"owner": "a", "host": "node-7", "pid": 1, "started": now, "heartbeat": now}))
    with pytest.raises(LeaseHeldError, match="host node-7, pid 1, since .* UTC \\(last heartbeat 0 s ago\\)"):
        Lease(output, timeout_s=300).acquire()
    later = Lease(output, timeout_s=300, clock=lambda: time.time() + 301)
    with caplog.at_level(logging.WARNING, logger="pipeline.lease"), later:
        assert later.holder().owner == later.owner  # type: ignore[union-attr]
    assert "host node-7" in caplog.text and "heartbeat stopped 301 s ago" in caplog.text
    assert later.holder() is None


def test_force_breaks_a_live_lease_and_its_holder_sees_it_lost(output: str, caplog: pytest.LogCaptureFixture) -> None:
    alive = holder(output)
    assert first_line(alive) == "held"
    with caplog.at_level(logging.WARNING, logger="pipeline.lease"), Lease(output, force=True) as forced:
        assert f"pid {alive.pid}" in caplog.text and "--force" in caplog.text
        assert finish(alive) == "lost"  # it finds the lease taken and leaves it alone
        assert forced.holder().owner == forced.owner  # type: ignore[union-attr]
    assert forced.holder() is None


def test_a_heartbeat_after_a_takeover_marks_the_old_run_lost(output: str) -> None:
    old = Lease(output, heartbeat_s=3600)
    old.acquire()
    try:
        with Lease(output, force=True):
            old.renew()
            assert old.lost
    finally:
        old.release()


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_released_on_errors_and_renewed_in_place(tmp_path: Path, scheme: str) -> None:
    location = f"{scheme}://{tmp_path}/out.zarr/probs"
    with pytest.raises(ValueError), hold_leases([location, location], heartbeat_s=3600) as [lease]:
        before = lease.holder()
        lease.renew()
        after = lease.holder()
        assert after is not None and before is not None and after.owner == before.owner
        assert after.heartbeat >= before.heartbeat and after.started == before.started
        raise ValueError("the run failed")
    assert lease.holder() is None and not lease.lost


def test_an_abandoned_takeover_marker_does_not_block_forever(output: str) -> None:
    stale = Lease(output, heartbeat_s=3600, clock=lambda: time.time() - 1000)
    stale.acquire()
    stale._stop.set()  # the holder "dies": no more heartbeats, lease left behind
    marker = Path(stale._path + f".takeover-{stale.owner}")
    marker.write_text(json.dumps({"owner": "a taker that died", "time": time.time() - 1000}))
    with Lease(output, timeout_s=300) as taker:
        assert taker.holder().owner == taker.owner  # type: ignore[union-attr]
    assert not marker.exists()


@pytest.mark.slow
def test_on_s3_creation_is_conditional_and_an_abandoned_lease_is_taken_over(s3: S3Server) -> None:  # noqa: F811
    output = f"s3://{s3.bucket('leases')}/out.zarr/probs"
    racers = [holder(output) for _ in range(3)]
    try:
        answers = [first_line(p) for p in racers]
    finally:
        done = [finish(p) for p in racers]
    assert answers.count("held") == 1 and done.count("released") == 1, (answers, done)
    stale = Lease(output, heartbeat_s=3600, clock=lambda: time.time() - 1000)
    stale.acquire()
    stale._stop.set()  # the holder dies, its lease stays
    with pytest.raises(LeaseHeldError, match=f"pid {os.getpid()}, since "):
        Lease(output, timeout_s=3600).acquire()
    with Lease(output, timeout_s=300) as taker:
        assert taker.holder().owner == taker.owner  # type: ignore[union-attr]
    assert taker.holder() is None


def test_an_unreadable_lease_is_an_error_that_force_clears(tmp_path: Path, output: str) -> None:
    lease = tmp_path / "out.zarr" / "probs.mitoseg" / "lease.json"
    lease.parent.mkdir(parents=True)
    lease.write_text('{"owner": "trunc')
    with pytest.raises(StorageError, match="lease .*lease.json is unreadable .*--force"):
        Lease(output).acquire()
    with Lease(output, force=True) as forced:
        assert forced.holder().owner == forced.owner  # type: ignore[union-attr]
