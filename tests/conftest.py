"""Shared fixtures: small synthetic volumes, a tiny network checkpoint (all under tmp_path) and a Dask client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.volumes import VolumeMeta, create_volume

LUCCHI = Path(__file__).resolve().parents[2] / "shared" / "data" / "lucchi" / "train.zarr"


def em_like(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Smooth random uint8 texture: cheap, deterministic, with structure a network responds to."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = rng.normal(size=shape).astype(np.float32)
    smooth = ndimage.gaussian_filter(noise, 2.0)
    smooth = (smooth - smooth.min()) / (np.ptp(smooth) + 1e-6)
    return (smooth * 255).astype(np.uint8)


def write_raw(url: str, data: np.ndarray, chunks: tuple[int, int, int] = (16, 32, 32)) -> str:
    """Write a (z, y, x) uint8 volume at `url` and return the URL."""
    meta = VolumeMeta(shape=data.shape, dtype=data.dtype, chunks=chunks, voxel_size_nm=(8.0, 4.0, 4.0))
    create_volume(url, meta).write(meta.roi, data[None])
    return url


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small randomly initialised network (deterministic), saved as a real checkpoint."""
    import torch

    from pipeline.config.network import NetworkConfig
    from pipeline.network.checkpoint import save_checkpoint
    from pipeline.network.model import build_network

    torch.manual_seed(0)
    cfg = NetworkConfig(widths=[4, 8], context=(1, 4, 4), embedding_dim=8)
    net = build_network(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, network_config=cfg, state_dict=net.state_dict(), patch_shape=(8, 32, 32))
    return path


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """An in-process Dask client with two one-thread workers, shared by a module's tests (fast to start)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="session")
def slurm() -> Iterator[None]:
    """A one-node SLURM cluster with job accounting on this machine (.ci/slurm-up), or a skip that says why not.

    Started once per session; stopped at the end only if this session started it.
    """
    import os
    import shutil
    import subprocess

    script = Path(__file__).resolve().parents[1] / ".ci" / "slurm-up"
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root: .ci/slurm-up installs and starts munged, slurmdbd, slurmctld and slurmd")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM tests need slurm-wlm installed or apt-get to install it (.ci/slurm-up)")
    was_running = _pid_alive(Path("/run/slurmctld.pid"))
    try:
        up = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(".ci/slurm-up did not finish within 15 minutes")
    if up.returncode != 0:
        pytest.skip(f".ci/slurm-up failed (status {up.returncode}): {(up.stdout + up.stderr)[-1500:]}")
    yield
    if not was_running:
        subprocess.run(["bash", str(script), "--stop"], capture_output=True, timeout=120)


def _pid_alive(pidfile: Path) -> bool:
    """Whether the process named in `pidfile` runs."""
    import os

    try:
        os.kill(int(pidfile.read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True
