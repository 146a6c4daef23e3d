"""`mitoseg plan`: the size of a segment job (blocks, tasks, files, bytes, resume state, time) from metadata only."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Device(str, Enum):
    """Kinds of worker with a recorded network throughput (`pipeline.sizing.THROUGHPUT_MVOX_S`)."""

    cpu = "cpu"
    h100 = "h100"


def _human(count: float, unit: str = "") -> str:
    for prefix in ("", "k", "M", "G", "T", "P", "E"):
        if abs(count) < 1000:
            return f"{count:.3g} {prefix}{unit}".rstrip()
        count /= 1000
    return f"{count:.3g} Z{unit}"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def plan(
    config: Annotated[Path | None, typer.Argument(help="Segment job file (YAML), as for `mitoseg segment`.")] = None,
    shape: Annotated[
        str | None, typer.Option("--shape", help="Size a uint8 input of Z,Y,X voxels described, not read.")
    ] = None,
    input: Annotated[str | None, typer.Option("--input", help="EM volume URL (only its metadata is read).")] = None,
    output: Annotated[list[str] | None, typer.Option("--output", help="Output volume URL; repeat for more.")] = None,
    block_size: Annotated[str | None, typer.Option("--block-size", help="Write block Z,Y,X (voxels).")] = None,
    shard_size: Annotated[str | None, typer.Option("--shard-size", help="Output shard Z,Y,X (voxels).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Workers; default the job's.")] = None,
    device: Annotated[Device, typer.Option("--device", help="Kind of worker the time is estimated for.")] = Device.cpu,
    throughput: Annotated[
        float | None,
        typer.Option("--throughput", min=0.0, help="Network Mvox/s of one worker, measured on yours (overrides)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Size a segment job before running it: reads metadata only, writes nothing."""
    from rich.console import Console

    from pipeline.cli.segment import parse_zyx
    from pipeline.config import load_config
    from pipeline.config.segment import SegmentConfig
    from pipeline.sizing import input_meta, size_job

    described = parse_zyx(shape, "--shape")
    overrides = {
        "input": input or ("(described by --shape)" if described else None),
        "output": output or None,
        "block_size": parse_zyx(block_size, "--block-size"),
        "shard_size": parse_zyx(shard_size, "--shard-size"),
    }
    cfg = load_config(SegmentConfig, config, overrides)
    size = size_job(cfg, input_meta(cfg, described), workers, device.value, throughput)
    plan = size.plan
    if as_json:
        summary = {
            "volume_shape": size.volume_shape,
            "region": [list(plan.roi.begin), list(plan.roi.shape)],
            "block_shape": plan.block_shape,
            "blocks": plan.num_blocks,
            "tasks": size.tasks,
            "voxels": size.voxels,
            "outputs": [o.__dict__ for o in size.outputs],
            "resume_bytes": size.resume_bytes,
            "workers": size.workers,
            "device": size.device,
            "mvox_per_s": size.mvox_per_s,
            "throughput_origin": size.origin,
            "estimate_s": size.estimate_s,
        }
        typer.echo(json.dumps(summary))
        return
    console = Console(soft_wrap=True)
    console.print(
        f"region {plan.roi.shape} voxels (z,y,x) of a {size.volume_shape} volume: {_human(size.voxels, 'voxels')}; "
        f"{plan.num_blocks:,} blocks of {plan.block_shape} on a {plan.grid_shape} grid, {size.tasks:,} Dask tasks"
    )
    for out in size.outputs:
        shard = f"shards {out.shards}" if out.sharded else f"shards {out.shards} (if shard_size = block_size)"
        levels = "sharded" if out.sharded else "unsharded"
        console.print(
            f"output {out.url}: scale 0 in chunks {out.chunks}: {out.files_unsharded:,} files, in {shard}: "
            f"{out.files_sharded:,} files; pyramid levels ({levels}): {out.pyramid_files:,} files; "
            f"{_human(out.bytes, 'B')} uncompressed",
            highlight=False,
        )
    console.print(f"resume state: {plan.num_blocks:,} done-records, about {_human(size.resume_bytes, 'B')}")
    console.print(
        f"estimated time: {_duration(size.estimate_s)} of network time on {size.workers} {size.device} worker(s) "
        f"at {size.mvox_per_s:g} Mvox/s each ({size.origin}); an estimate, not a measurement",
        highlight=False,
    )
