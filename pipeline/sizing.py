"""What a segment job will cost before it runs: blocks, tasks, files and bytes per output, resume state, time.

Reads metadata only (the input's, existing outputs', the checkpoint's shape facts), never voxels, so it sizes a
petabyte job in a second. Times are estimates from a recorded per-worker network throughput, not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from daisy import Roi

from pipeline.config.cluster import BatchClusterConfig, LocalClusterConfig
from pipeline.config.segment import SegmentConfig
from pipeline.errors import StorageError
from pipeline.geometry import Vec3, cell_ranges, parse_roi
from pipeline.plan import BlockPlan, common_shard, plan_blocks
from pipeline.resume import RECORD_BYTES
from pipeline.volumes import VolumeMeta, open_volume, parse_volume_url

THROUGHPUT_MVOX_S: dict[str, tuple[float, str]] = {
    "cpu": (0.43, "measured: a network of the shipped lucchi's size, one forward pass, 2 CPU cores, float32"),
    "h100": (2500.0, "bound, not measured: 3.2e5 FLOP per voxel at 800 TFLOP/s (bf16); real runs are slower"),
}
"""Output voxels per second of one worker's network (Mvox/s, no patch overlap counted), and where it comes from."""


@dataclass(frozen=True)
class OutputSize:
    """Files and bytes one output gets: scale 0 unsharded and sharded, and its pyramid (data files only)."""

    url: str
    chunks: Vec3
    shards: Vec3
    sharded: bool
    """Whether the output is (or will be) sharded; `shards` is the proposed shard (the block) when it is not."""
    files_unsharded: int
    files_sharded: int
    pyramid_files: int
    """Files of the down-sampled levels (one per chunk, or per shard when the output is sharded)."""
    bytes: int
    """Uncompressed voxel bytes, pyramid included; compression makes the stored size smaller."""


@dataclass(frozen=True)
class JobSize:
    """The size of a segment job and its estimated time on `workers` workers."""

    volume_shape: Vec3
    plan: BlockPlan
    tasks: int
    outputs: list[OutputSize]
    resume_bytes: int
    voxels: int
    patch_voxels: int
    """Voxels the network outputs (patch minus its context) over the tiles it computes: every tile once per block
    it meets, times the test-time passes."""
    workers: int
    device: str
    mvox_per_s: float
    origin: str
    """Where `mvox_per_s` comes from (measured, a bound, or given)."""

    @property
    def estimate_s(self) -> float:
        """Seconds of network time on all workers (an estimate: I/O and scheduling overlap with it)."""
        return self.patch_voxels / (self.mvox_per_s * 1e6 * self.workers)


def _cells(roi: Roi, cell: Vec3) -> int:
    return math.prod(len(r) for r in cell_ranges(roi, cell))


def _pyramid(meta: VolumeMeta, roi: Roi) -> tuple[int, int]:
    """Files and voxels of the pyramid levels over `roi`: one file per chunk, or per shard of a sharded output."""
    from pipeline.viewing.pyramid import pyramid_levels

    files = voxels = 0
    for level in pyramid_levels(meta.shape, meta.chunks, meta.voxel_size_nm, shards=meta.shards):
        f = level.total_factor
        scaled = Roi(
            [b // k for b, k in zip(roi.begin, f, strict=True)],
            [-(-e // k) - b // k for b, e, k in zip(roi.begin, roi.end, f, strict=True)],
        )
        files += _cells(scaled, level.shards or meta.chunks)
        voxels += math.prod(scaled.shape)
    return files, voxels


def planned_workers(config: SegmentConfig) -> int:
    """Workers the job's cluster section asks for (a batch cluster at its largest)."""
    cluster = config.cluster
    if isinstance(cluster, LocalClusterConfig):
        return cluster.workers
    if isinstance(cluster, BatchClusterConfig):
        return cluster.max_jobs * cluster.processes
    return cluster.min_workers


def input_meta(config: SegmentConfig, shape: Vec3 | None = None) -> VolumeMeta:
    """The input's metadata: a uint8 volume of `shape` when given (described, not read), else the input's own,
    else the synthetic volume the job would generate where the input is absent."""
    if shape is not None:
        return VolumeMeta(shape=shape, dtype=np.dtype(np.uint8), chunks=tuple(min(64, s) for s in shape))  # type: ignore[arg-type]
    try:
        return open_volume(config.input, scale=config.input_scale).meta
    except StorageError:
        if config.synthetic is None:
            raise
        spec = config.synthetic
        chunks = tuple(min(64, s) for s in spec.shape)
        return VolumeMeta(shape=spec.shape, dtype=np.dtype(np.uint8), chunks=chunks, voxel_size_nm=spec.voxel_size_nm)  # type: ignore[arg-type]


def _existing_meta(url: str) -> VolumeMeta | None:
    try:
        return open_volume(url).meta
    except StorageError:
        return None


def size_job(
    config: SegmentConfig,
    source: VolumeMeta,
    workers: int | None = None,
    device: str = "cpu",
    mvox_per_s: float | None = None,
) -> JobSize:
    """Size `config` over an input with metadata `source` on `workers` workers (the config's when None) of
    `device`; `mvox_per_s` replaces the recorded throughput. Loads only the checkpoint's shape facts."""
    from pipeline.network.checkpoint import resolve_checkpoint
    from pipeline.network.tta import variants
    from pipeline.segment import network_info, patch_grid

    net = network_info(str(resolve_checkpoint(config.checkpoint)))
    grid = patch_grid(config, net, source.shape)
    network_output = math.prod(p - 2 * c for p, c in zip(grid.patch_shape, net.context, strict=True))
    roi = parse_roi(config.roi) if config.roi else source.roi
    voxels = math.prod(roi.shape)
    chunks = tuple(min(c, b) for c, b in zip(config.chunk_size, config.block_size, strict=True))
    new = source.derive(
        dtype=np.dtype(config.output_dtype), num_channels=net.out_channels, chunks=chunks, shards=config.shard_size
    )
    metas = [_existing_meta(u) or new for u in config.output]
    shards = common_shard(metas[0].chunks, (m.write_unit for m in metas))
    plan = plan_blocks(source.shape, metas[0].chunks, config.block_size, roi, shard_shape=shards)
    outputs = []
    for url, meta in zip(config.output, metas, strict=True):
        pyramid_files, pyramid_voxels = _pyramid(meta, roi) if config.pyramid else (0, 0)
        shard = meta.shards or plan.block_shape
        outputs.append(
            OutputSize(
                url=str(parse_volume_url(url)),
                chunks=meta.chunks,
                shards=shard,
                sharded=meta.shards is not None,
                files_unsharded=_cells(roi, meta.chunks),
                files_sharded=_cells(roi, shard),
                pyramid_files=pyramid_files,
                bytes=(voxels + pyramid_voxels) * meta.num_channels * meta.dtype.itemsize,
            )
        )
    rate, origin = THROUGHPUT_MVOX_S[device]
    if mvox_per_s is not None:
        rate, origin = mvox_per_s, "given on the command line"
    passes = len(variants(config.tta))
    return JobSize(
        volume_shape=source.shape,
        plan=plan,
        tasks=plan.num_blocks,  # one Dask task per block
        outputs=outputs,
        resume_bytes=plan.num_blocks * RECORD_BYTES,
        voxels=voxels,
        patch_voxels=grid.tiles_computed(roi, plan.block_shape) * network_output * passes,
        workers=workers or planned_workers(config),
        device=device,
        mvox_per_s=rate,
        origin=origin,
    )
