"""`mitoseg segment`: a probability volume from an EM volume, block by block on Dask."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import ConfigError


def parse_zyx(text: str | None, option: str) -> tuple[int, int, int] | None:
    """Three comma-separated integers (z, y, x) from an option, or None."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError as err:
        raise ConfigError(f"{option} {text!r} must be three integers Z,Y,X such as 64,256,256") from err
    if len(values) != 3:
        raise ConfigError(f"{option} {text!r} must be three integers Z,Y,X such as 64,256,256")
    return values  # type: ignore[return-value]


def segment(
    config: Annotated[Path | None, typer.Argument(help="YAML job file (configs/*.yaml); options override it.")] = None,
    input: Annotated[str | None, typer.Option("--input", help="EM volume URL or local path.")] = None,
    output: Annotated[list[str] | None, typer.Option("--output", help="Output volume URL (repeatable).")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Network checkpoint (.pt).")] = None,
    block_size: Annotated[str | None, typer.Option("--block-size", help="Write block Z,Y,X in voxels.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Local Dask worker processes.")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Existing Dask scheduler address.")] = None,
    roi: Annotated[str | None, typer.Option("--roi", help="Region OFFSET:SHAPE, z,y,x voxels.")] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Recompute blocks already recorded as done.")] = False,
) -> None:
    """Segment mitochondria: write one probability channel per network output."""
    from rich.console import Console

    from pipeline.config import load_config
    from pipeline.config.segment import SegmentConfig
    from pipeline.segment import segment as run_segment
    from pipeline.synthetic_input import ensure_synthetic_input

    overrides = {
        "input": input,
        "output": output or None,
        "checkpoint": checkpoint,
        "block_size": parse_zyx(block_size, "--block-size"),
        "workers": workers,
        "scheduler": scheduler,
        "roi": roi,
        "resume": False if no_resume else None,
    }
    cfg = load_config(SegmentConfig, config, overrides)
    ensure_synthetic_input(cfg)
    result = run_segment(cfg)
    console = Console(soft_wrap=True)
    run = result.run
    console.print(
        f"segment: {run.completed} block(s) computed, {run.skipped} skipped (already done), {run.failed} failed "
        f"of {run.total}; {run.voxels / 1e6:.2f} Mvoxels in {run.seconds:.1f} s "
        f"({run.voxels_per_second / 1e6:.3f} Mvox/s)"
    )
    for url in result.outputs:
        console.print(f"output: {url}")
    if run.failures:
        console.print("[bold red]failed blocks[/] (the others were written; re-run the same command to retry):")
        for failure in run.failures:
            console.print(f"  block {failure.block_id} at {failure.write_roi}: {failure.error}", highlight=False)
        raise typer.Exit(1)
    from pipeline.viewing import view_command

    console.print(f"view: {view_command([cfg.input, *result.outputs])}", highlight=False)
