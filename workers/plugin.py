"""A Dask WorkerPlugin that loads the network once per worker, onto its GPU when it has one.

Each plugin is named for the network's content hash, device and precision, so several jobs with different
networks can share one cluster: a block asks for its job's plugin by name and never runs another network.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin

log = logging.getLogger(__name__)

PLUGIN_PREFIX = "mitoseg-model"


def plugin_name(content_hash: str, device: str = "auto", precision: str = "auto", optimize: bool = True) -> str:
    """The name of the plugin that runs this network with these settings (one per network on a cluster)."""
    return f"{PLUGIN_PREFIX}-{content_hash[:16]}-{device}-{precision}{'' if optimize else '-unfolded'}"


class ModelPlugin(WorkerPlugin):
    """Carries the checkpoint's bytes to every worker (no shared filesystem needed) and loads it there."""

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "auto",
        precision: str = "auto",
        optimize: bool = True,
        content_hash: str | None = None,
    ):
        """`content_hash` is the checkpoint's (read from it when not given); workers check the network they load."""
        if content_hash is None:
            from pipeline.network.checkpoint import load_checkpoint

            content_hash = load_checkpoint(checkpoint, device="cpu").content_hash
        self.checkpoint_bytes = Path(checkpoint).read_bytes()
        self.checkpoint_name = Path(checkpoint).name
        self.content_hash = content_hash
        self.device = device
        self.precision = precision
        self.optimize = optimize
        self.name = plugin_name(content_hash, device, precision, optimize)
        self.predictor: Any = None

    def setup(self, worker: Any) -> None:
        from workers.patch_predictor import Predictor

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, self.checkpoint_name)
            Path(path).write_bytes(self.checkpoint_bytes)
            predictor = Predictor(path, self.device, self.precision, self.optimize)
        if predictor.checkpoint.content_hash != self.content_hash:
            from pipeline.errors import ModelLoadError

            raise ModelLoadError(
                f"{self.checkpoint_name} holds network {predictor.checkpoint.content_hash[:12]}, not the "
                f"{self.content_hash[:12]} its job planned with; the file changed since: run the job again"
            )
        self.predictor = predictor
        log.info("worker %s loaded %s on %s", worker.address, self.checkpoint_name, self.predictor.device)

    def teardown(self, worker: Any) -> None:
        self.predictor = None


def worker_predictor(name: str) -> Any:
    """The predictor of plugin `name` on the current Dask worker (set up by ModelPlugin); never another network."""
    from distributed import get_worker

    from pipeline.errors import ModelLoadError

    plugin = get_worker().plugins.get(name)
    if not isinstance(plugin, ModelPlugin) or plugin.predictor is None:
        loaded = sorted(n for n in get_worker().plugins if str(n).startswith(PLUGIN_PREFIX))
        raise ModelLoadError(
            f"this Dask worker has no network {name} loaded (it has {loaded or 'none'}): register the job's "
            "ModelPlugin before submitting its blocks"
        )
    return plugin.predictor
