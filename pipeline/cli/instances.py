"""`mitoseg instances`: mitochondria with one ID each across the whole volume, and a table of them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.options import Force, Roi, Scheduler, SummaryJson, Workers
from pipeline.config.instances import InstancesConfig


def instances(
    config: Annotated[Path | None, typer.Argument(help="YAML job file (configs/*.yaml); options override it.")] = None,
    input: Annotated[str | None, typer.Option("--input", help="Probability volume URL (from segment).")] = None,
    output: Annotated[str | None, typer.Option("--output", help="Label volume URL (zarr or precomputed).")] = None,
    table: Annotated[str | None, typer.Option("--table", help="Object table path (.parquet or .csv).")] = None,
    block_size: Annotated[
        str | None,
        typer.Option("--block-size", help="Block Z,Y,X in voxels.", show_default="whole chunks near 64,256,256"),
    ] = None,
    workers: Workers = None,
    scheduler: Scheduler = None,
    roi: Roi = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Recompute blocks already recorded as done.")] = False,
    force: Force = False,
    summary_json: SummaryJson = None,
) -> None:
    """Decode instances blockwise with IDs consistent across block borders; measure every object."""
    from rich.console import Console

    from pipeline.cli.report import print_failures, print_instances
    from pipeline.cli.segment import parse_zyx
    from pipeline.cli.summary import summarised
    from pipeline.cluster import dask_client
    from pipeline.config import load_config
    from pipeline.instances.run import prepare_instances, run_instances
    from pipeline.viewing import view_command
    from pipeline.volumes import resolve_version

    with summarised(summary_json, "instances", input) as summary:
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
        if cfg.input:  # a reprocessed probability output is read at its current version
            cfg = cfg.model_copy(update={"input": str(resolve_version(cfg.input))})
        summary.input = cfg.input
        job = prepare_instances(cfg)  # every check before the cluster starts
        with dask_client(cfg.cluster) as client:
            result = run_instances(job, client, force=force)
        summary.add_instances(result)
        console = Console(soft_wrap=True)
        print_instances(console, result)
        if result.failures:
            print_failures(console, result.failures)
            raise typer.Exit(1)
        console.print(f"view: {view_command([url for url in (cfg.input, result.output) if url])}", highlight=False)
