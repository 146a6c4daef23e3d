"""A Dask WorkerPlugin that loads the network once per worker, onto its GPU when it has one."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin

log = logging.getLogger(__name__)

PLUGIN_NAME = "mitoseg-model"


class ModelPlugin(WorkerPlugin):
    """Carries the checkpoint's bytes to every worker (no shared filesystem needed) and loads it there."""

    name = PLUGIN_NAME

    def __init__(self, checkpoint: str | Path, device: str = "auto", precision: str = "auto", optimize: bool = True):
        self.checkpoint_bytes = Path(checkpoint).read_bytes()
        self.checkpoint_name = Path(checkpoint).name
        self.device = device
        self.precision = precision
        self.optimize = optimize
        self.predictor: Any = None

    def setup(self, worker: Any) -> None:
        from workers.patch_predictor import Predictor

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, self.checkpoint_name)
            Path(path).write_bytes(self.checkpoint_bytes)
            self.predictor = Predictor(path, self.device, self.precision, self.optimize)
        log.info("worker %s loaded %s on %s", worker.address, self.checkpoint_name, self.predictor.device)

    def teardown(self, worker: Any) -> None:
        self.predictor = None


def worker_predictor() -> Any:
    """The predictor of the current Dask worker (set up by ModelPlugin)."""
    from distributed import get_worker

    from pipeline.errors import ModelLoadError

    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, ModelPlugin) or plugin.predictor is None:
        raise ModelLoadError("this Dask worker has no network loaded: register ModelPlugin before submitting blocks")
    return plugin.predictor
