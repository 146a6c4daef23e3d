"""Ablation of Li et al. (EMBC 2021): the four loss/sampling rows at the same budget and seeds.

    .venv/bin/python benchmarks/ablation.py                  # small budget, synthetic data, minutes on CPU
    .venv/bin/python benchmarks/ablation.py --iterations 2000 --seeds 0 1 2 --data lucchi   # bigger budget

Prints validation Jaccard (tuned threshold) as mean +- spread (half the max-min range) per row.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import time
from pathlib import Path

from pipeline.config.train import TrainConfig
from pipeline.training.loop import train

ROWS = {
    "a  L_seg only": {"lambda_sim": 0.0, "lambda_con": 0.0},
    "b  + L_sim, random points": {"lambda_sim": 0.1, "lambda_con": 0.0, "sampling": {"mode": "random"}},
    "c  + L_sim, hard points": {"lambda_sim": 0.1, "lambda_con": 0.0, "sampling": {"mode": "uncertainty"}},
    "d  + L_sim + L_con, hard points": {"lambda_sim": 0.1, "lambda_con": 0.1, "sampling": {"mode": "uncertainty"}},
}


def _data(kind: str, work: Path) -> dict:
    if kind == "lucchi":
        lucchi = "../shared/data/lucchi/train.zarr"
        return {
            "volumes": [
                {
                    "raw": f"{lucchi}/raw",
                    "label": f"{lucchi}/label",
                    "train": {"z": [0, 130]},
                    "validation": {"z": [130, 165]},
                }
            ],
            "split_name": "lucchi-z130",
            "patch_shape": [8, 128, 128],
        }
    return {
        "volumes": [
            {
                "raw": str(work / "train.zarr/raw"),
                "label": str(work / "train.zarr/label"),
                "synthetic": {"shape": [32, 128, 128], "seed": 201},
                "train": {},
            },
            {
                "raw": str(work / "val.zarr/raw"),
                "label": str(work / "val.zarr/label"),
                "synthetic": {"shape": [16, 128, 128], "seed": 202},
                "train": None,
                "validation": {},
            },
        ],
        "split_name": "synthetic seed 201 / 202",
        "patch_shape": [8, 64, 64],
    }


def config(row_id: str, row: dict, seed: int, iterations: int, kind: str, work: Path) -> TrainConfig:
    """One run of one row: everything but the loss terms is shared by all rows."""
    loss = {"contrastive_warmup": iterations // 5, **row}
    loss["sampling"] = {"num_points": 256, **row.get("sampling", {})}
    return TrainConfig.model_validate(
        {
            "name": "ablation",
            "output_dir": str(work / "runs" / f"{row_id}_seed{seed}"),
            "seed": seed,
            "num_threads": 1,
            "data": _data(kind, work),
            "network": {"widths": [8, 16, 32], "kernel_z": [1, 3, 3], "embedding_dim": 32, "context": [1, 8, 8]},
            "loss": loss,
            "optim": {"lr": 0.002, "warmup_iterations": max(1, iterations // 20), "iterations": iterations},
            "log_every": max(1, iterations // 10),
            "checkpoint_every": iterations,
            "val_every": iterations,
            "val_patch_shape": [8, 128, 128] if kind == "synthetic" else [16, 256, 256],
            "val_overlap": 0.0,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=150, help="training iterations per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds per row (>= 2)")
    parser.add_argument("--data", choices=["synthetic", "lucchi"], default="synthetic")
    parser.add_argument("--work", type=Path, default=Path("runs/ablation"), help="scratch folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, list[float]] = {}
    start = time.perf_counter()
    for name, row in ROWS.items():
        for seed in args.seeds:
            cfg = config(name.split()[0], row, seed, args.iterations, args.data, args.work)
            shutil.rmtree(cfg.output_dir, ignore_errors=True)
            result = train(cfg)
            results.setdefault(name, []).append(float(result.best_jaccard or 0.0))
            print(f"{name:34s} seed {seed}: val jaccard {results[name][-1]:.4f}", flush=True)
    print(
        f"\n{args.data}, {args.iterations} iterations, seeds {args.seeds}, "
        f"{(time.perf_counter() - start) / 60:.1f} min total\n"
    )
    print("| row | validation Jaccard (mean ± half-range) | runs |\n|---|---|---|")
    for name, scores in results.items():
        spread = (max(scores) - min(scores)) / 2
        print(f"| {name} | {statistics.mean(scores):.4f} ± {spread:.4f} | {', '.join(f'{s:.4f}' for s in scores)} |")


if __name__ == "__main__":
    main()
