"""`mitoseg segment`: a probability volume from an EM volume, block by block on Dask."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.options import Force, Roi, Scheduler, SummaryJson, Workers, config_default
from pipeline.config.cluster import BatchClusterConfig
from pipeline.config.segment import SegmentConfig
from pipeline.errors import ConfigError
from pipeline.geometry import as_zyx
from pipeline.network.tta import TTAMode


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
    return as_zyx(values, option)


def parse_fractions(text: str | None, option: str) -> float | list[float] | None:
    """One fraction, or three comma-separated ones (z, y, x), from an option, or None; the config checks ranges."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as err:
        raise ConfigError(f"{option} {text!r} must be one fraction or three Z,Y,X such as 0.75,0.25,0.25") from err
    return values[0] if len(values) == 1 else values


class ClusterKind(str, Enum):
    local = "local"
    slurm = "slurm"
    pbs = "pbs"
    lsf = "lsf"
    scheduler_file = "scheduler_file"


def cluster_overrides(kind: ClusterKind | None, **fields: object) -> dict[str, object]:
    """Config overrides from the cluster options: `--cluster` starts a new section, the others set its fields."""
    from pipeline.config import REMOVE

    given = {name: value for name, value in fields.items() if value is not None}
    if kind is None and "scheduler_file" in given:
        kind = ClusterKind.scheduler_file
    if kind is not None:  # the job file's cluster, and its short forms, give way
        return {"cluster": {"kind": kind.value, **given}, "workers": REMOVE, "scheduler": REMOVE}
    return {f"cluster.{name}": value for name, value in given.items()}


def _batch(field: str) -> str:
    """The default of a batch cluster field (slurm, pbs, lsf), as `--help` shows it."""
    return str(BatchClusterConfig.model_fields[field].default)


def segment(
    config: Annotated[Path | None, typer.Argument(help="YAML job file (configs/*.yaml); options override it.")] = None,
    input: Annotated[str | None, typer.Option("--input", help="EM volume URL or local path.")] = None,
    output: Annotated[list[str] | None, typer.Option("--output", help="Output volume URL (repeatable).")] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            "--checkpoint",
            help="Network: a shipped name (lucchi, demo) or a .pt file.",
            show_default=config_default(SegmentConfig, "checkpoint"),
        ),
    ] = None,
    block_size: Annotated[
        str | None,
        typer.Option(
            "--block-size",
            help="Write block Z,Y,X in voxels.",
            show_default=config_default(SegmentConfig, "block_size"),
        ),
    ] = None,
    workers: Workers = None,
    scheduler: Scheduler = None,
    cluster: Annotated[
        ClusterKind | None,
        typer.Option(
            "--cluster",
            help="Where workers run; replaces the job file's cluster section.",
            show_default=config_default(SegmentConfig, "cluster"),
        ),
    ] = None,
    scheduler_file: Annotated[
        str | None, typer.Option("--scheduler-file", help="Scheduler file of a running scheduler.")
    ] = None,
    max_jobs: Annotated[
        int | None,
        typer.Option("--max-jobs", help="Batch jobs at most (slurm, pbs, lsf).", show_default=_batch("max_jobs")),
    ] = None,
    gpus_per_job: Annotated[
        int | None,
        typer.Option("--gpus-per-job", help="GPUs per batch job (0 or 1).", show_default=_batch("gpus_per_job")),
    ] = None,
    queue: Annotated[
        str | None, typer.Option("--queue", help="Batch partition or queue.", show_default="the site's default")
    ] = None,
    walltime: Annotated[
        str | None, typer.Option("--walltime", help="Batch job walltime, HH:MM:SS.", show_default=_batch("walltime"))
    ] = None,
    min_workers: Annotated[
        int | None,
        typer.Option(
            "--min-workers", help="Workers to wait for before the first block.", show_default=_batch("min_workers")
        ),
    ] = None,
    roi: Roi = None,
    overlap: Annotated[
        str | None,
        typer.Option(
            "--overlap",
            help="Tile overlap: one fraction, or Z,Y,X (e.g. 0.75,0.25,0.25).",
            show_default=config_default(SegmentConfig, "overlap"),
        ),
    ] = None,
    no_resume: Annotated[
        bool,
        typer.Option("--no-resume", help="Recompute every block, even unchanged ones, into the existing outputs."),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Delete existing outputs and their done-records, then create them anew."),
    ] = False,
    tta: Annotated[
        TTAMode | None,
        typer.Option(
            "--tta",
            help="Test-time augmentation: none, yx (8 passes) or zyx (16 passes).",
            show_default=config_default(SegmentConfig, "tta"),
        ),
    ] = None,
    median_size: Annotated[
        int | None,
        typer.Option(
            "--median",
            help="Median-filter the probabilities over an N^3 cube (odd; 0 = off). Default: the checkpoint's.",
        ),
    ] = None,
    instances: Annotated[
        str | None, typer.Option("--instances", help="Also decode instances into this label volume URL.")
    ] = None,
    force: Force = False,
    summary_json: SummaryJson = None,
) -> None:
    """Segment mitochondria: write one probability channel per network output."""
    from rich.console import Console

    from pipeline.cli.report import print_failures, print_instances, print_pyramids, print_run
    from pipeline.cli.summary import summarised
    from pipeline.config import load_config
    from pipeline.config.instances import InstancesConfig
    from pipeline.segment import segment as run_segment
    from pipeline.storage import redact
    from pipeline.synthetic import ensure_synthetic_input
    from pipeline.viewing import view_command

    with summarised(summary_json, "segment", input) as summary:
        overrides = {
            "input": input,
            "output": output or None,
            "checkpoint": checkpoint,
            "block_size": parse_zyx(block_size, "--block-size"),
            "workers": workers,
            "scheduler": scheduler,
            **cluster_overrides(
                cluster,
                scheduler_file=scheduler_file,
                max_jobs=max_jobs,
                gpus_per_job=gpus_per_job,
                queue=queue,
                walltime=walltime,
                min_workers=min_workers,
            ),
            "roi": roi,
            "overlap": parse_fractions(overlap, "--overlap"),
            "resume": False if no_resume else None,
            "overwrite": True if overwrite else None,
            "tta": tta,
            "median_size": median_size,
        }
        cfg = load_config(SegmentConfig, config, overrides)
        summary.input = cfg.input
        if instances:
            section = cfg.instances or InstancesConfig()
            cfg = cfg.model_copy(update={"instances": section.model_copy(update={"output": instances})})
        ensure_synthetic_input(cfg)
        result = run_segment(cfg, force=force)
        summary.add_segment(result)
        console = Console(soft_wrap=True)
        print_run(console, "segment", result.run)
        print_pyramids(console, result.extra.get("pyramids", {}))
        for url in result.outputs:
            console.print(f"output: {redact(url)}")
        shown = [cfg.input, *result.outputs]
        follow = result.extra.get("instances")
        if follow is not None:
            print_instances(console, follow)
            shown.append(follow.output)
        if result.failures:
            print_failures(console, result.failures)
            raise typer.Exit(1)
        console.print(f"view: {view_command(shown)}", highlight=False)
