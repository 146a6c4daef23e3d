"""Pieces shared by the commands' options: the defaults that `--help` shows come from the config models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel

from pipeline.config.cluster import ClusterJob


def config_default(model: type[BaseModel], path: str) -> str:
    """The default of a config field as `--help` shows it (`cluster.workers` reads nested models; Z,Y,X triples)."""
    first, _, rest = path.partition(".")
    value = model.model_fields[first].get_default(call_default_factory=True)
    for name in rest.split(".") if rest else []:
        value = getattr(value, name)
    if isinstance(value, tuple | list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(getattr(value, "kind", value))


Workers = Annotated[
    int | None,
    typer.Option(
        "--workers", help="Local Dask worker processes.", show_default=config_default(ClusterJob, "cluster.workers")
    ),
]
Scheduler = Annotated[str | None, typer.Option("--scheduler", help="Existing Dask scheduler address.")]
Roi = Annotated[str | None, typer.Option("--roi", help="Region OFFSET:SHAPE, z,y,x voxels.")]
Force = Annotated[
    bool, typer.Option("--force", help="Break another run's lease on the outputs (only when that run is gone).")
]
SummaryJson = Annotated[
    Path | None, typer.Option("--summary-json", help="Write counts, failures, durations and versions here as JSON.")
]
