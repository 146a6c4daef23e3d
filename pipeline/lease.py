"""One writer at a time: a run's lease on its output, kept alive by a heartbeat.

The lease is a small JSON object `<output>.mitoseg/lease.json` (owner id, host, pid, start and heartbeat times),
on the output's own storage. It is created exclusively and whole: a hard link of a written file on local files
(fails when the name exists, as `O_EXCL` does), a conditional write (`If-None-Match: *` on S3,
`ifGenerationMatch=0` on GCS, both through fsspec's `xb` mode) on object stores, so two runs never both create it.
A heartbeat thread rewrites it every `heartbeat_s` seconds (an atomic rename on local files, a whole-object put on
object stores). A lease whose heartbeat is older than `timeout_s` belongs to a run that died, and so does one whose
process no longer exists on this host (a run killed and restarted at once; hosts are told apart by name): the next
run takes it over, and only one can, because the taker must first create a takeover marker named for the stale
owner, exclusively (the marker of a taker that died is itself abandoned after `timeout_s`). `force` breaks a live
lease the same way. Staleness compares the holder's clock with the taker's, so hosts' clocks must agree to well
within the timeout. A storage without exclusive creation (a plain HTTP store) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import LeaseHeldError, StorageError
from pipeline.execution import BlockFailure
from pipeline.resume import state_location
from pipeline.storage import filesystem

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"
DEFAULT_TIMEOUT_S = 300.0
"""Seconds without a heartbeat after which a lease counts as abandoned and may be taken over."""
DEFAULT_HEARTBEAT_S = 30.0
"""Seconds between heartbeats of a held lease."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: a run-unique owner id, where the run is, and when it started and last renewed."""

    owner: str
    host: str
    pid: int
    started: float
    """Unix time the lease was taken, seconds."""
    heartbeat: float
    """Unix time of the last renewal, seconds."""

    def describe(self, now: float) -> str:
        """`host H, pid P, since <UTC time> (last heartbeat N s ago)`, for messages."""
        since = datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"host {self.host}, pid {self.pid}, since {since} (last heartbeat {now - self.heartbeat:.0f} s ago)"


def _process_exists(pid: int) -> bool:
    """Whether a process `pid` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The lease of one output; a context manager that acquires it, heartbeats it, and releases it.

    `clock` (Unix seconds) is injectable so that tests can age a lease without waiting.
    """

    def __init__(
        self,
        output_location: str,
        *,
        force: bool = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.output = output_location
        self.url = f"{state_location(output_location)}/{LEASE_NAME}"
        self.force = force
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self.owner = uuid.uuid4().hex
        self.lost = False
        """Set when another run replaced this lease while it was held (this run was taken for dead)."""
        self.lost_to = ""
        """Who holds the lease after it was lost."""
        self._fs, self._path = filesystem(self.url)
        self._local = isinstance(self._fs, LocalFileSystem)
        self._started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # storage -------------------------------------------------------------------------------------------------

    def holder(self) -> Holder | None:
        """The current holder, or None when nobody holds the lease."""
        try:
            text = self._fs.cat_file(self._path)
        except FileNotFoundError:
            return None
        except Exception as err:
            raise StorageError(f"cannot read the lease {self.url}: {err}") from err
        try:
            return Holder(**json.loads(text))
        except (ValueError, TypeError) as err:
            raise StorageError(
                f"the lease {self.url} is unreadable ({err}); if no run is writing {self.output}, delete it or run "
                "with --force"
            ) from err

    def _record(self) -> bytes:
        holder = Holder(self.owner, socket.gethostname(), os.getpid(), self._started, self.clock())
        return json.dumps(asdict(holder)).encode()

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        """Create `path` holding `data` unless it exists, in one step; say whether this call created it.

        Local files: a hard link of a complete temporary file (`link` fails when the name exists, like `O_EXCL`,
        and nobody ever reads a half-written lease); object stores: one conditional put."""
        try:
            self._fs.makedirs(self._fs._parent(path), exist_ok=True)
            if self._local:
                temporary = f"{path}.{self.owner}.tmp"
                with open(temporary, "wb") as file:
                    file.write(data)
                try:
                    os.link(temporary, path)
                finally:
                    os.unlink(temporary)
            else:
                with self._fs.open(path, "xb") as file:
                    file.write(data)
        except FileExistsError:  # the name exists; s3fs and gcsfs raise it on a failed precondition
            return False
        except Exception as err:
            raise StorageError(f"cannot create {path} beside {self.output}: {err}") from err
        return True

    def _replace(self, data: bytes) -> None:
        """Overwrite the lease in one step: a rename over it on local files, one whole-object put elsewhere."""
        if self._local:
            temporary = f"{self._path}.{self.owner}.tmp"
            with open(temporary, "wb") as file:
                file.write(data)
            os.replace(temporary, self._path)
        else:
            self._fs.pipe_file(self._path, data)

    # acquire / renew / release -------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease, or take over an abandoned one (or any one with `force`); else raise LeaseHeldError."""
        self._started = self.clock()
        for _ in range(3):  # a holder may release or another run take over between our steps: look again
            if self._create_exclusive(self._path, self._record()):
                break
            try:
                current = self.holder()
            except StorageError:
                if not self.force:
                    raise
                log.warning("removing the unreadable lease %s (--force)", self.url)
                self._fs.rm_file(self._path)
                continue
            if current is None:
                continue
            if self._take_over(current):
                break
        else:
            raise LeaseHeldError(f"cannot take the lease {self.url}: it changed hands repeatedly while trying")
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.output}", daemon=True)
        self._thread.start()
        log.debug("took the lease on %s (owner %s)", self.output, self.owner)

    def _take_over(self, current: Holder) -> bool:
        """Replace `current`'s lease when it is abandoned or `force` is set; raise when it is alive."""
        now = self.clock()
        age = now - current.heartbeat
        gone = current.host == socket.gethostname() and not _process_exists(current.pid)
        if age <= self.timeout_s and not gone and not self.force:
            raise LeaseHeldError(
                f"output {self.output} is being written by another run ({current.describe(now)}); wait for it to "
                f"finish, or, if that run is gone, run again with --force (a lease without a heartbeat for "
                f"{self.timeout_s:.0f} s is taken over without it)"
            )
        marker = f"{self._path}.takeover-{current.owner}"
        if not self._create_exclusive(marker, json.dumps({"owner": self.owner, "time": now}).encode()):
            self._clear_abandoned_marker(marker, now)
            return False  # another run is taking over the same holder: look at the lease again
        try:
            if self.holder() != current:
                return False
            self._replace(self._record())
        finally:
            self._fs.rm_file(marker)
        if gone:
            reason = "its process no longer runs on this host"
        elif age > self.timeout_s:
            reason = f"its heartbeat stopped {age:.0f} s ago"
        else:
            reason = "breaking it (--force)"
        log.warning("took over the lease on %s from %s: %s", self.output, current.describe(now), reason)
        return True

    def _clear_abandoned_marker(self, marker: str, now: float) -> None:
        """Remove the takeover marker of a taker that died before finishing (older than `timeout_s`)."""
        try:
            taken = json.loads(self._fs.cat_file(marker))["time"]
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError):
            taken = 0.0
        if now - taken > self.timeout_s:
            log.warning("removing the abandoned takeover marker %s", marker)
            self._fs.rm_file(marker)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as err:  # a transient storage fault: try again at the next beat
                log.warning("cannot renew the lease on %s: %s", self.output, err)
            if self.lost:
                return

    def _still_mine(self) -> bool:
        """Whether this run still holds the lease; if not, mark it `lost` and say who took it."""
        current = self.holder()
        if current is not None and current.owner == self.owner:
            return True
        if not self.lost:
            self.lost_to = current.describe(self.clock()) if current else "nobody (it was deleted)"
            log.error(
                "the lease on %s is now held by %s; this run's writes may mix with theirs", self.output, self.lost_to
            )
        self.lost = True
        return False

    def failure(self) -> BlockFailure | None:
        """A lease lost during the run, as a failure of the run (its output may hold another run's writes)."""
        if not self.lost:
            return None
        text = (
            f"another run took over this run's lease ({self.lost_to}); its writes may be mixed with this run's: "
            "re-run the command once that run has finished"
        )
        return BlockFailure(0, "", text, unit=f"{self.output} lease")

    def renew(self) -> None:
        """Write a new heartbeat time, unless another run has taken the lease over (then it is `lost`)."""
        if self._still_mine():
            self._replace(self._record())

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if self._still_mine():
                self._fs.rm_file(self._path)
        except Exception as err:  # the run's result matters more than a leftover lease, which will time out
            log.warning("cannot release the lease on %s: %s; it expires after %.0f s", self.output, err, self.timeout_s)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


@contextmanager
def hold_leases(output_locations: list[str], *, force: bool = False, **options: Any) -> Iterator[list[Lease]]:
    """Hold the leases of every output for the duration of a `with` block; released also on errors."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(Lease(location, force=force, **options)) for location in dict.fromkeys(output_locations)
        ]
