"""A stand-in for cloud-files on the lent GPU machine, whose image lacks cloud-files' large dependency tree (boto3,
google-cloud-storage, pathos, ...): the three calls `segment`'s done-records make (pipeline/resume.py), for local
paths only. experiments/device/run.sh puts it on PYTHONPATH there; nothing else uses it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class CloudFiles:
    def __init__(self, location: str, progress: bool = False):
        if "://" in location and not location.startswith("file://"):
            raise ValueError(f"the device shim of cloudfiles handles local paths only, not {location}")
        self.root = Path(location.removeprefix("file://"))

    def list(self) -> list[str]:
        return sorted(path.name for path in self.root.iterdir()) if self.root.is_dir() else []

    def put(self, name: str, content: bytes, compress: str | None = None, content_type: str | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / name).write_bytes(content)

    def delete(self, names: Iterable[str]) -> None:
        for name in names:
            (self.root / name).unlink(missing_ok=True)
