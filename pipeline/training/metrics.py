"""Training metrics: one CSV row per logged step, mirrored to TensorBoard when it is installed."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class MetricsLog:
    """CSV files (train.csv, val.csv) and TensorBoard events under the run folder (rank 0 only)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tb"))
        except ImportError:  # tensorboard is optional for the loop; CSV always works
            logger.warning("tensorboard not installed: metrics go to CSV only")

    def write(self, name: str, step: int, values: dict[str, float]) -> None:
        path = self.folder / f"{name}.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", *values])
            writer.writerow([step, *(f"{v:.6g}" for v in values.values())])
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{name}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
