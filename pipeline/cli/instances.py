"""`mitoseg instances`: mitochondria with one ID each across the whole volume, and a table of them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def instances(
    config: Annotated[Path | None, typer.Argument(help="YAML job file (configs/*.yaml); options override it.")] = None,
    input: Annotated[str | None, typer.Option("--input", help="Probability volume URL (from segment).")] = None,
    output: Annotated[str | None, typer.Option("--output", help="Label volume URL (zarr or precomputed).")] = None,
    table: Annotated[str | None, typer.Option("--table", help="Object table path (.parquet or .csv).")] = None,
    block_size: Annotated[str | None, typer.Option("--block-size", help="Block Z,Y,X in voxels.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Local Dask worker processes.")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Existing Dask scheduler address.")] = None,
    roi: Annotated[str | None, typer.Option("--roi", help="Region OFFSET:SHAPE, z,y,x voxels.")] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Recompute blocks already recorded as done.")] = False,
) -> None:
    """Decode instances blockwise with IDs consistent across block borders; measure every object."""
    from rich.console import Console

    from pipeline.cli.report import print_failures, print_instances
    from pipeline.cli.segment import parse_zyx
    from pipeline.cluster import dask_client
    from pipeline.config import load_config
    from pipeline.config.instances import InstancesConfig
    from pipeline.instances.run import prepare_instances, run_instances
    from pipeline.viewing import view_command

    overrides = {
        "input": input,
        "output": output,
        "table": table,
        "block_size": parse_zyx(block_size, "--block-size"),
        "workers": workers,
        "scheduler": scheduler,
        "roi": roi,
        "resume": False if no_resume else None,
    }
    cfg = load_config(InstancesConfig, config, overrides)
    job = prepare_instances(cfg)  # every check before the cluster starts
    with dask_client(cfg.cluster) as client:
        result = run_instances(job, client)
    console = Console(soft_wrap=True)
    print_instances(console, result)
    if result.failures:
        print_failures(console, result.failures)
        raise typer.Exit(1)
    console.print(f"view: {view_command([url for url in (cfg.input, result.output) if url])}", highlight=False)
