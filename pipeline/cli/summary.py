"""`--summary-json PATH`: what a run did, as one JSON file for batch systems and dashboards.

Written at the end of every run, also when it fails (exit 1: failures listed) or stops on an error (exit 2: the
message): the exit status, per-stage block counts, durations and throughput, every failure, the versions that made
the output (mitoseg, torch, the checkpoint's content hash) and the URLs of input and outputs, credentials removed.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import typer

from pipeline.errors import MitosegError
from pipeline.execution import BlockFailure, RunResult
from pipeline.storage import redact

FORMAT = 1
"""Version of the summary's layout; it grows when fields change meaning."""


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def stage_record(name: str, run: RunResult, seconds: float | None = None, **extra: Any) -> dict[str, Any]:
    """Counts, duration and throughput of one blockwise stage."""
    took = run.seconds if seconds is None else seconds
    return {
        "stage": name,
        **extra,
        "total": run.total,
        "completed": run.completed,
        "skipped": run.skipped + run.unchanged,
        "failed": run.failed,
        "voxels": run.voxels,
        "seconds": round(took, 3),
        "voxels_per_second": round(run.voxels / took, 1) if took > 0 else 0.0,
    }


def failure_record(failure: BlockFailure) -> dict[str, Any]:
    return {
        "unit": redact(failure.unit),
        "id": failure.block_id,
        "region": failure.write_roi,
        "error": redact(failure.error),
    }


@dataclass
class Summary:
    """The summary of one command's run, filled in as its stages report and written once at the end."""

    command: str
    input: str | None = None
    outputs: list[str] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    failures: list[BlockFailure] = field(default_factory=list)
    checkpoint_hash: str | None = None
    exit_code: int = 0
    error: str | None = None
    started: float = field(default_factory=time.time)

    def add_segment(self, result: Any) -> None:
        """A `pipeline.segment.SegmentResult`: its blocks, each output's pyramid, and the instances after it."""
        self.outputs += result.outputs
        self.stages.append(stage_record("segment", result.run))
        for url, pyramid in result.extra.get("pyramids", {}).items():
            self._add_pyramid(url, pyramid)
        self.failures += result.failures
        if "instances" in result.extra:
            self._add_instance_stages(result.extra["instances"])
        self.checkpoint_hash = self.checkpoint_hash or _provenance(result.outputs[0]).get("checkpoint_hash")

    def add_instances(self, result: Any) -> None:
        """A `pipeline.instances.run.InstancesResult`; the network is the one that made its input."""
        self._add_instance_stages(result)
        self.failures += result.failures
        if self.input:
            self.checkpoint_hash = _provenance(self.input).get("checkpoint_hash")

    def _add_instance_stages(self, result: Any) -> None:
        self.outputs.append(result.output)
        if result.table:
            self.outputs.append(result.table)
        for name, run in zip(("decode", "match", "relabel"), result.passes, strict=False):
            self.stages.append(stage_record(name, run, result.seconds.get(name)))
        if result.pyramid is not None:
            self._add_pyramid(result.output, result.pyramid)
        if result.meshes is not None and result.meshes.run is not None:
            self.stages.append(stage_record("meshes", result.meshes.run, output=redact(result.output)))

    def _add_pyramid(self, url: str, pyramid: Any) -> None:
        for level, run in zip(pyramid.levels, pyramid.runs, strict=True):
            self.stages.append(stage_record(f"pyramid s{level.index}", run, output=redact(url)))

    def record(self) -> dict[str, Any]:
        """The JSON document."""
        finished = time.time()
        first = next((s for s in self.stages if s["stage"] in ("segment", "decode")), None)
        return {
            "format": FORMAT,
            "command": self.command,
            "exit_code": self.exit_code,
            "status": {0: "ok", 1: "failed"}.get(self.exit_code, "error"),
            "error": self.error,
            "started": _utc(self.started),
            "finished": _utc(finished),
            "seconds": round(finished - self.started, 3),
            "input": redact(self.input) if self.input else None,
            "outputs": [redact(url) for url in dict.fromkeys(self.outputs)],
            "blocks": {k: sum(s[k] for s in self.stages) for k in ("total", "completed", "skipped", "failed")},
            "voxels_per_second": first["voxels_per_second"] if first else 0.0,
            "stages": self.stages,
            "failures": [failure_record(f) for f in self.failures],
            "versions": {
                "mitoseg": _version("mitoseg"),
                "torch": _version("torch"),
                "python": platform.python_version(),
                "checkpoint_hash": self.checkpoint_hash,
            },
        }

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.record(), indent=2) + "\n")


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _provenance(url: str) -> dict[str, Any]:
    from pipeline.volumes import open_volume

    try:
        record = open_volume(url).provenance
    except MitosegError:  # the summary reports what is known; a missing record is not a new failure
        return {}
    return record if isinstance(record, dict) else {}


@contextmanager
def summarised(path: Path | None, command: str, input: str | None = None) -> Iterator[Summary]:
    """A Summary for the `with` block, written to `path` (when given) however the block ends.

    The exit status comes from how it ends: normally 0, `typer.Exit(code)`, or 2 for a mitoseg error."""
    summary = Summary(command, input=input)
    try:
        yield summary
    except typer.Exit as stop:
        summary.exit_code = stop.exit_code
        raise
    except MitosegError as err:
        summary.exit_code, summary.error = 2, redact(str(err))
        raise
    except KeyboardInterrupt:
        summary.exit_code, summary.error = 130, "interrupted"
        raise
    except BaseException as err:
        summary.exit_code, summary.error = 1, redact(f"{type(err).__name__}: {err}")
        raise
    finally:
        if path is not None:
            summary.write(path)
