"""Done-records of completed blocks, so that a re-run only computes what is missing.

One empty object per block under `<output>.mitoseg/done/<job key>/`, written by the worker only after the
block's data is written. The job key hashes everything that defines a block's output (input, region,
plan, network, output settings): a changed job never reuses stale marks.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.errors import StorageError


def job_key(**parts: Any) -> str:
    """A short stable hash of the parts that define a job's output."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_location(output_location: str) -> str:
    """Where mitoseg keeps its run state for an output (beside it, so it travels with it)."""
    return output_location.rstrip("/") + ".mitoseg"


class DoneMarkers:
    """The set of completed block ids of one job, stored beside the output (any cloud-files URL)."""

    def __init__(self, output_location: str, key: str):
        self.key = key
        self.location = f"{state_location(output_location)}/done/{key}"

    def _files(self) -> Any:
        from cloudfiles import CloudFiles

        return CloudFiles(self.location, progress=False)

    def load(self) -> set[int]:
        """Ids of the blocks recorded as done."""
        try:
            names = list(self._files().list())
        except Exception as err:
            raise StorageError(f"cannot list done-records at {self.location}: {err}") from err
        return {int(n.rsplit("/", 1)[-1]) for n in names if n.rsplit("/", 1)[-1].isdigit()}

    def mark(self, block_id: int) -> None:
        """Record block `block_id` as done (call only after its data is written)."""
        try:
            self._files().put(str(block_id), b"", compress=None, content_type="application/octet-stream")
        except Exception as err:
            raise StorageError(f"cannot write done-record {block_id} at {self.location}: {err}") from err

    def clear(self) -> None:
        """Forget every done-record of this job (a run with resume switched off)."""
        files = self._files()
        files.delete(list(files.list()))
