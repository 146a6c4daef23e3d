"""Neuroglancer viewing of mitoseg outputs: pyramids, meshes, viewer state and a local server.

Importing this package is cheap; the modules import their heavy dependencies when used.
"""

from __future__ import annotations

import shlex

from pipeline.storage import redact

__all__ = ["view_command"]


def view_command(urls: list[str]) -> str:
    """The `mitoseg view` command line that opens `urls` in Neuroglancer."""
    return " ".join(["mitoseg", "view", *(shlex.quote(redact(str(u))) for u in urls)])
