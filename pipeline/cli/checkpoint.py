"""`mitoseg checkpoint info|export|average`: inspect a checkpoint, shrink one for shipping, average several."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import ConfigError

app = typer.Typer(
    name="checkpoint",
    help="Inspect, export and average network checkpoints (a path, or a shipped name such as lucchi or demo).",
    no_args_is_help=True,
)

Median = Annotated[
    int | None, typer.Option("--median", help="Median size N (odd; 0 = none) segment applies by default.")
]
Threshold = Annotated[
    float | None, typer.Option("--threshold", help="Decision threshold to record (strictly between 0 and 1).")
]
PatchShape = Annotated[str | None, typer.Option("--patch-shape", help="Inference patch Z,Y,X to record.")]
Margin = Annotated[
    str | None, typer.Option("--margin", help="Voxels Z,Y,X cut from each side of a patch's prediction to record.")
]
Overlap = Annotated[str | None, typer.Option("--overlap", help="Tile overlap Z,Y,X (fractions) to record.")]
Half = Annotated[
    bool, typer.Option("--half", help="Store the weights as float16: half the size; outputs move by its rounding.")
]


def _recommendations(
    median_size: int | None, threshold: float | None, patch: str | None, margin: str | None, overlap: str | None
) -> dict[str, object]:
    """The inference settings given on the command line, as `export_checkpoint` takes them."""

    def axes(text: str | None, kind: type) -> list | None:
        return None if text is None else [kind(v) for v in text.split(",")]

    return {
        "median_size": median_size,
        "threshold": threshold,
        "patch_shape": axes(patch, int),
        "margin": axes(margin, int),
        "overlap": axes(overlap, float),
    }


@app.command()
def info(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint file (.pt) or shipped name (lucchi, demo).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """The network, its recommended threshold, median and patch shape, its content hash and how it was trained."""
    from pipeline.network.checkpoint import checkpoint_info

    facts = checkpoint_info(checkpoint)
    if as_json:
        typer.echo(json.dumps(facts))
        return
    rows = {k: v for k, v in facts.items() if k not in ("training", "network_config")}
    rows.update({f"training {k}": v for k, v in facts["training"].items()})
    rows["network_config"] = json.dumps(facts["network_config"])
    width = max(map(len, rows))
    for key, value in rows.items():
        typer.echo(f"{key:<{width}}  {_text(value)}")


def _text(value: object) -> str:
    """One line for a fact: numbers with thousands separators, lists and score dicts comma-separated."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="Training checkpoint (.pt) or shipped name.")],
    target: Annotated[Path, typer.Argument(help="Where to write the small checkpoint (.pt).")],
    median_size: Median = None,
    threshold: Threshold = None,
    patch_shape: PatchShape = None,
    margin: Margin = None,
    overlap: Overlap = None,
    half: Half = False,
) -> None:
    """Copy a checkpoint without optimizer state and projection head (small, for shipping), recording the inference
    settings given."""
    from pipeline.network.checkpoint import export_checkpoint

    recommend = _recommendations(median_size, threshold, patch_shape, margin, overlap)
    try:
        digest = export_checkpoint(source, target, half=half, **recommend)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    typer.echo(f"wrote {target} (content hash {digest})")


@app.command()
def average(
    sources: Annotated[list[str], typer.Argument(help="Checkpoints of one network config, fine-tuned from one start.")],
    output: Annotated[Path, typer.Option("--output", help="Where to write the averaged checkpoint (.pt).")],
    median_size: Median = None,
    threshold: Threshold = None,
    patch_shape: PatchShape = None,
    margin: Margin = None,
    overlap: Overlap = None,
    half: Half = False,
) -> None:
    """Average the weights of several checkpoints of one network (a "model soup") into one small checkpoint."""
    from pipeline.network.checkpoint import average_checkpoints

    recommend = _recommendations(median_size, threshold, patch_shape, margin, overlap)
    try:
        digest = average_checkpoints(sources, output, half=half, **recommend)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    typer.echo(f"wrote {output}: the average of {len(sources)} checkpoint(s) (content hash {digest})")
