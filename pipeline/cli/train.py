"""`mitoseg train`: thin wrapper that loads the config and calls the training loop."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer


def train(
    config: Annotated[Path, typer.Argument(help="Training YAML file, e.g. configs/lucchi.yaml.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT/last.pt, same schedule.")] = False,
    max_iterations: Annotated[
        int | None, typer.Option("--max-iterations", help="Stop at this step (the schedule stays the config's).")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Run folder (overrides output_dir).")] = None,
    time_budget: Annotated[
        float | None,
        typer.Option(
            "--time-budget",
            help="Wall-clock minutes for the schedule (overrides optim.time_budget_minutes; e.g. a job's time limit).",
        ),
    ] = None,
) -> None:
    """Train the segmentation network (one process, or under torchrun with DDP)."""
    from pipeline.config import load_config
    from pipeline.config.train import TrainConfig
    from pipeline.training.loop import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = {"output_dir": str(output) if output else None, "optim.time_budget_minutes": time_budget}
    cfg = load_config(TrainConfig, config, overrides)
    result = run_training(cfg, resume=resume, max_iterations=max_iterations)
    best = f"{result.best_jaccard:.4f}" if result.best_jaccard is not None else "n/a"
    voxel = "unknown" if result.voxel_size_nm is None else f"{list(result.voxel_size_nm)} nm"
    typer.echo(
        f"stopped at step {result.step}; best validation jaccard {best}; "
        f"best checkpoint {result.best_checkpoint}; last {result.last_checkpoint}; trained at voxel size {voxel}"
    )
