"""What the commands print at the end of a run: block counts, failures, instance summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from pipeline.execution import BlockFailure, RunResult
from pipeline.storage import redact


def print_run(console: Console, name: str, run: RunResult, seconds: float | None = None) -> None:
    """One line: blocks computed, skipped, failed, and the throughput."""
    took = run.seconds if seconds is None else seconds
    rate = f" ({run.voxels_per_second / 1e6:.3f} Mvox/s)" if run.voxels else ""
    why = f"{run.unchanged} unchanged: same job and input as when written" if run.unchanged else "already done"
    console.print(
        f"{name}: {run.completed} block(s) computed, {run.skipped + run.unchanged} skipped ({why}), "
        f"{run.failed} failed of {run.total}; {run.voxels / 1e6:.2f} Mvoxels in {took:.1f} s{rate}"
    )


def print_failures(console: Console, failures: list[BlockFailure]) -> None:
    """The blocks that failed after their retries, so the user can see what to fix before re-running."""
    console.print("[bold red]failed blocks[/] (every other block was written; re-run the same command to retry):")
    for failure in failures:
        console.print(f"  {failure.unit} {failure.block_id} at {failure.write_roi}: {failure.error}", highlight=False)


def print_pyramids(console: Console, pyramids: dict[str, Any]) -> None:
    """One line per pyramid level written, for each volume ({url: PyramidResult})."""
    for url, pyramid in pyramids.items():
        for level, run in zip(pyramid.levels, pyramid.runs, strict=True):
            print_run(console, f"pyramid s{level.index} of {redact(url)}", run)


def print_instances(console: Console, result: Any) -> None:
    """Per-pass counts, the viewing stages and the object summary of an instances run."""
    for name, run in zip(("decode", "match", "relabel"), result.passes, strict=False):
        print_run(console, name, run, result.seconds.get(name))
    if result.pyramid is not None:
        print_pyramids(console, {result.output: result.pyramid})
    if result.meshes is not None and result.meshes.run is not None:
        print_run(console, "meshes", result.meshes.run)
    if result.relabel is not None and result.relabel.ok:  # the labels are written (a viewing stage may have failed)
        console.print(
            f"instances: {result.num_objects} objects; {result.equivalences} equivalences across block faces "
            f"({result.border_ids} border IDs of {result.border_objects} objects at block faces, all the merge "
            f"held); output {result.output}"
        )
        if getattr(result, "fixups", 0):
            console.print(
                f"watershed: {result.fixups} foreground region(s) crossing block borders with several seeds "
                f"decoded whole in {result.seconds.get('fixup', 0.0):.1f} s"
            )
        if result.table:
            console.print(f"table: {result.table}")
