"""Training speed of `mitoseg train`'s own loop: patches/s per batch size, loader workers and precision.

Runs the real loop (`pipeline.training.loop.train`) with a config's network, patch shape, loss and augmentation on
a synthetic volume (so it runs anywhere) for a few iterations per variant, and prints one table: device,
batch, loader workers, precision, median patches/s over the logged intervals after the first (warm-up: cuDNN
autotuning, worker start), and peak GPU memory. docs/benchmarks.md explains the table.

    python benchmarks/train_speed.py --config configs/lucchi.yaml --batch 1 8 --workers 0 6 \
        --precision bf16 fp32 --iterations 40
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.config.train import DataConfig, TrainConfig  # noqa: E402
from pipeline.training.loop import train  # noqa: E402

LOG_EVERY = 5


def variant(base: TrainConfig, folder: Path, batch: int, workers: int, precision: str, iterations: int) -> TrainConfig:
    """`base` on a synthetic volume under `folder`, without validation, init or time budget."""
    shape = [max(2 * p, 32) for p in base.data.patch_shape[:1]] + [max(2 * p, 256) for p in base.data.patch_shape[1:]]
    source = {
        "raw": str(folder / "syn.zarr" / "raw"),
        "label": str(folder / "syn.zarr" / "label"),
        "synthetic": {"shape": shape, "seed": 0},
    }
    data = {**base.data.model_dump(), "volumes": [source], "batch_size": batch, "loader_workers": workers}
    optim = base.optim.model_copy(update={"iterations": iterations, "time_budget_minutes": None})
    return base.model_copy(
        update={
            "data": DataConfig.model_validate(data),
            "optim": optim,
            "init_from": None,
            "mixed_precision": precision == "bf16",
            "output_dir": str(folder / f"b{batch}_w{workers}_{precision}"),
            "log_every": LOG_EVERY,
            "checkpoint_every": iterations,
            "snapshot_every": None,
        }
    )


def measure(cfg: TrainConfig) -> tuple[float, float]:
    """Median patches/s after the first logged interval, and peak GPU memory in GiB (0 on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    with (Path(cfg.output_dir) / "train.csv").open() as handle:
        speeds = [float(row["patches_per_s"]) for row in csv.DictReader(handle)][1:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return statistics.median(speeds), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/lucchi.yaml", help="training config whose network is timed")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--precision", nargs="+", default=["bf16"], choices=["bf16", "fp32"])
    parser.add_argument("--iterations", type=int, default=30, help="iterations per variant (at least 3 logs)")
    args = parser.parse_args()
    base = load_config(TrainConfig, Path(args.config))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch, workers, precision in itertools.product(args.batch, args.workers, args.precision):
            speed, peak = measure(variant(base, Path(tmp), batch, workers, precision, args.iterations))
            if precision == "bf16" and not torch.cuda.is_available():
                precision = "fp32 (bf16 is GPU only)"
            rows.append((batch, workers, precision, speed, peak))
            print(f"batch {batch} workers {workers} {precision}: {speed:.1f} patches/s", flush=True)
    patch = "x".join(map(str, base.data.patch_shape))
    print(f"\n{args.config}: network widths {list(base.network.widths)}, patch {patch}, {device}")
    print("| batch | loader workers | precision | patches/s | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|")
    for batch, workers, precision, speed, peak in rows:
        print(f"| {batch} | {workers} | {precision} | {speed:.1f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
