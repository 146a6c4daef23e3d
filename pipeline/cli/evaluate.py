"""`mitoseg evaluate`: semantic metrics of a prediction volume against ground truth, chunk by chunk."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer


class PredictionKind(str, Enum):
    """How the prediction volume is read."""

    auto = "auto"
    probability = "probability"
    label = "label"


def evaluate(
    prediction: Annotated[str, typer.Option("--prediction", help="Probability or label volume URL (channel 0).")],
    truth: Annotated[str, typer.Option("--truth", help="Ground-truth volume URL; any value > 0 is mitochondrion.")],
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", min=0.0, max=1.0, help="Probability threshold; default from provenance, else 0.5."),
    ] = None,
    kind: Annotated[
        PredictionKind,
        typer.Option(
            "--kind",
            help="Prediction kind; auto: floats and uint8 written by segment are probabilities, 0/1 masks labels.",
        ),
    ] = PredictionKind.auto,
    roi: Annotated[
        str | None,
        typer.Option("--roi", help="Score only OFFSET:SHAPE (z,y,x voxels); default the region segment predicted."),
    ] = None,
    ignore_label: Annotated[
        int | None,
        typer.Option(
            "--ignore-label",
            help="Truth value of unlabelled voxels (sparse annotations, e.g. 255): they are not scored, and only "
            "semantic scores are given.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Foreground IoU (Jaccard), Dice and mean IoU of a prediction against ground truth."""
    from pipeline.evaluation import evaluate_all
    from pipeline.geometry import parse_roi
    from pipeline.storage import redact
    from pipeline.volumes import resolve_version

    prediction, truth = (str(resolve_version(url)) for url in (prediction, truth))  # current versions
    scores = evaluate_all(prediction, truth, threshold, kind.value, parse_roi(roi) if roi else None, ignore_label)
    if as_json:
        typer.echo(json.dumps(scores))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", title=redact(f"{prediction} vs {truth}"))
    for key, value in scores.items():
        table.add_row(key, f"{value:.4f}")
    Console().print(table)
