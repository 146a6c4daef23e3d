"""`python -m pipeline.training CONFIG [--resume] [--max-iterations N] [--output DIR]` (for torchrun)."""

from __future__ import annotations

import typer

from pipeline.cli.train import train

if __name__ == "__main__":
    typer.run(train)
