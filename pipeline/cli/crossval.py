"""`mitoseg crossval`: thin wrapper that loads a training config, cross-validates it and prints the fold table."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.errors import ConfigError


def _sizes(text: str) -> list[int]:
    """Median sizes from '0,5,7'."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as err:
        raise ConfigError(f"--median {text!r}: give comma-separated odd sizes, or 0 for none (e.g. 0,5,7)") from err


def crossval(
    config: Annotated[Path, typer.Argument(help="Training YAML file, e.g. configs/lucchi.yaml.")],
    folds: Annotated[int, typer.Option("--folds", help="K: contiguous z-folds of each training volume.")] = 5,
    gap: Annotated[
        int | None,
        typer.Option("--gap", help="Slices not trained on at each side of a held-out slab (default: patch depth / 2)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder of the fold runs and the report (default: OUTPUT_DIR-crossval)."),
    ] = None,
    median: Annotated[
        str, typer.Option("--median", help="Median sizes to choose from, comma-separated (0 = none), e.g. 0,5,7.")
    ] = "0",
    max_iterations: Annotated[
        int | None, typer.Option("--max-iterations", help="Stop each fold at this step (for short runs).")
    ] = None,
    time_budget: Annotated[
        float | None,
        typer.Option("--time-budget", help="Wall-clock minutes per fold (overrides optim.time_budget_minutes)."),
    ] = None,
) -> None:
    """Choose the threshold (and median filter) by K-fold cross-validation on the training volumes: one network per
    fold, settings that maximise the pooled out-of-fold Jaccard. Finished folds are not trained again."""
    from pipeline.config import load_config
    from pipeline.config.train import TrainConfig
    from pipeline.training.crossval import cross_validate

    cfg = load_config(TrainConfig, config, {"optim.time_budget_minutes": time_budget})
    folder = out or Path(f"{cfg.output_dir}-crossval")
    words = ["mitoseg", "crossval", str(config), "--folds", str(folds), "--out", str(folder), "--median", median]
    for flag, value in (("--gap", gap), ("--max-iterations", max_iterations), ("--time-budget", time_budget)):
        words += [] if value is None else [flag, str(value)]
    result = cross_validate(
        cfg,
        folds=folds,
        out=folder,
        gap=gap,
        medians=_sizes(median),
        max_iterations=max_iterations,
        command=shlex.join(words),
    )
    typer.echo(_table(result.report))
    typer.echo(f"folds trained now {result.trained}, reused {result.reused}; report {result.path}")


def _table(report: dict[str, Any]) -> str:
    """The report as a fold table, the spread, the chosen settings and how to apply them."""
    chosen, spread = report["chosen"], report["across_folds"]
    lines = [f"{'fold':<5} {'held-out z':<24} {'step':>6} {'jaccard':>8} {'dice':>7} {'own best threshold':>19}"]
    for row in report["folds"]:
        slabs = ", ".join(f"{v['z'][0]}..{v['z'][1] - 1}" for v in row["validation"])
        lines.append(
            f"{row['fold']:<5} {slabs:<24} {row['step']:>6} {row['jaccard']:>8.4f} {row['dice']:>7.4f} "
            f"{row['threshold_alone']:>19.3f}"
        )
    j, d = spread["jaccard"], spread["dice"]
    lines.append(
        f"across folds (mean ± std): jaccard {j['mean']:.4f} ± {j['std']:.4f}, dice {d['mean']:.4f} ± {d['std']:.4f}"
    )
    options = ", ".join(
        f"median {c['median']}: {c['threshold']:.3f} -> {c['jaccard']:.4f}" for c in report["candidates"]
    )
    lines.append(
        f"chosen on the pooled out-of-fold predictions: threshold {chosen['threshold']:.3f}, median {chosen['median']} "
        f"(pooled Jaccard {report['pooled']['jaccard']:.4f}; {options})"
    )
    lines.append("to apply them to the network trained on all the data:")
    lines += [f"  {step}" for step in report["apply"]]
    return "\n".join(lines)
