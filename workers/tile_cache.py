"""Tiles a worker computed recently, kept by the content of their input patch, so that neighbouring blocks share them.

A patch that straddles a block border is needed by each block it meets. A tile's result is a function of its input
patch alone (the network, the per-tile median and the trim; `pipeline.stitching.tile_forward`), so a worker that
runs the neighbouring block next finds it here instead of computing it again: the same bytes, at a fraction of the
time. Keys are the job key and a digest of the patch's bytes, so a changed input or another job never hits.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

DEFAULT_MB = 512
"""Memory for kept tiles per worker process (MITOSEG_TILE_CACHE_MB; 0 turns the cache off): about 200 tiles of the
`lucchi` defaults, more than the tiles on one face of a 64 x 1024 x 1024 block."""


class TileCache:
    """Least-recently-used tile results up to `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._tiles: OrderedDict[tuple[str, bytes], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def wrap(self, tile_fn: Callable[[np.ndarray], np.ndarray], job: str) -> Callable[[np.ndarray], np.ndarray]:
        """`tile_fn` answered from the cache where this job computed the same patch before."""
        if self.max_bytes <= 0:
            return tile_fn

        def cached(patch: np.ndarray) -> np.ndarray:
            key = (job, hashlib.blake2b(np.ascontiguousarray(patch).data, digest_size=16).digest())
            with self._lock:
                found = self._tiles.get(key)
                if found is not None:
                    self._tiles.move_to_end(key)
                    self.hits += 1
                    return found
            result = tile_fn(patch)
            if result.base is not None:  # a view (a trimmed tile) would keep its whole parent alive
                result = result.copy()
            result.setflags(write=False)  # shared by every block that reads it
            with self._lock:
                self.misses += 1
                self._tiles[key] = result
                self._bytes += result.nbytes
                while self._bytes > self.max_bytes and self._tiles:
                    _, dropped = self._tiles.popitem(last=False)
                    self._bytes -= dropped.nbytes
            return result

        return cached


_worker_cache: TileCache | None = None


def worker_tile_cache() -> TileCache:
    """This process's tile cache, sized by MITOSEG_TILE_CACHE_MB (default `DEFAULT_MB`)."""
    global _worker_cache
    if _worker_cache is None:
        _worker_cache = TileCache(int(float(os.environ.get("MITOSEG_TILE_CACHE_MB", DEFAULT_MB)) * 2**20))
    return _worker_cache
