"""A Dask WorkerPlugin that gives every worker the client's S3 endpoint and redacted logs.

Workers are separate processes, on external clusters started elsewhere with their own environment: the plugin
(registered with the scheduler, so workers that join later get it too) sets the client's endpoint before any
block runs. Credentials do not travel: each worker finds its own through the standard chains.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed import WorkerPlugin

from pipeline import storage

PLUGIN_NAME = "mitoseg-storage"


class StoragePlugin(WorkerPlugin):
    """Sets the client's S3 endpoint (None: the worker's own environment decides) on each worker."""

    name = PLUGIN_NAME

    def __init__(self, s3_endpoint_url: str | None):
        self.s3_endpoint_url = s3_endpoint_url

    def setup(self, worker: Any) -> None:
        storage.configure(self.s3_endpoint_url)
        storage.redact_logs()
        storage.redact_logs(logging.getLogger("distributed"))


def share_storage(client: Any) -> None:
    """Register the StoragePlugin with this process's S3 endpoint on `client`'s cluster."""
    client.register_plugin(StoragePlugin(storage.s3_endpoint()))
