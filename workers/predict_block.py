"""Per-block prediction inside a Dask worker: read with mirror padding, blend patches, write the valid region.

A worker's network (`workers.patch_predictor.Predictor`) predicts a batch of patches per call; on a GPU the block's
input is copied there once and blended, median-filtered and quantised there, and only the written bytes come back.

A block first fingerprints the input region it reads (context included); when its previous record names the
same job, device class and fingerprint, the data it wrote then is still what it would write now, so it skips the
network and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

from daisy import Block

from pipeline.block_stages import BlockStages
from pipeline.errors import StorageError
from pipeline.network.inputs import InputChecks
from pipeline.network.tta import TTAMode
from pipeline.resume import BlockRecord, Recorded, fingerprint
from pipeline.stitching import (
    Batched,
    Blending,
    PatchFn,
    PatchGrid,
    predict_region,
    read_mirrored,
    tile_forward,
    to_output_dtype,
)
from pipeline.volumes import Volume, open_volume
from workers.patch_predictor import Predictor
from workers.tile_cache import worker_tile_cache


@dataclass(frozen=True)
class PredictJob:
    """Everything a worker needs to compute any block of one segment run (small; sent with each block)."""

    input_url: str
    output_urls: tuple[str, ...]
    volume_shape: tuple[int, int, int]
    grid: PatchGrid
    output_dtype: str = "uint8"
    blending: Blending = "gaussian"
    tta: TTAMode = "none"
    median_size: int = 0
    """Median filter of each tile's probabilities (`pipeline.stitching.tile_forward`); 0 = none."""
    tile_trim: tuple[int, int, int] = (0, 0, 0)
    """Voxels cut from each side of a tile's prediction beyond the network's context (the grid's margin minus it)."""
    input_scale: int = 0
    """Scale level of the input that `volume_shape` and the outputs' grid are of."""
    input_checks: InputChecks = InputChecks()
    key: str = ""
    """The job key (`pipeline.resume.job_key`): everything above, the network, plan and settings, hashed."""
    network: str = ""
    """Name of the worker plugin that runs this job's network (`workers.plugin.plugin_name`)."""
    output_ids: tuple[str, ...] = ()
    """Identity of each output (stored in its metadata when it was created), in `output_urls` order."""
    batch_size: int | None = None
    """Patches per network call; None = the worker's default for its device (`Predictor.batch_size`)."""


@lru_cache(maxsize=16)
def _open(url: str, mode: str, tag: str, scale: int = 0) -> Volume:
    """Volumes stay open for the life of the worker process, per job or output identity (`tag`): a re-created
    volume is opened afresh, never written through stale metadata."""
    return open_volume(url, mode=mode, scale=scale)


def _output(url: str, output_id: str) -> Volume:
    """The output at `url`, checked to be the one its job created or opened (not a replacement).

    The identity is read from storage for every block (one small metadata read), so a block never writes into an
    output that another run re-created after this worker opened it."""
    volume = _open(url, "r+", output_id)
    found = open_volume(url).provenance.get("output_id") if output_id else None
    if output_id and found != output_id:
        raise StorageError(
            f"output {url} was replaced while this job ran (its identity is {found}, the job's {output_id}); "
            "nothing was written to it: run the job again"
        )
    return volume


@dataclass(frozen=True)
class _Read:
    """A block's input as read (context included), with its fingerprint and the block's earlier record."""

    block: Block
    read_roi: Any
    source: Volume
    data: Any
    print: str
    previous: BlockRecord | None


@dataclass(frozen=True)
class _Computed:
    """A block's output bytes, ready to write."""

    block: Block
    data: Any
    record: BlockRecord


def read_block(block: Block, previous: BlockRecord | None = None, *, job: PredictJob) -> _Read:
    """Read `block`'s input (context included, mirrored at the volume's faces) and fingerprint it."""
    source = _open(job.input_url, "r", job.key, job.input_scale)
    read_roi = job.grid.read_roi(block.write_roi)
    data = read_mirrored(job.input_checks.reader(source), read_roi, job.volume_shape)
    return _Read(block, read_roi, source, data, fingerprint(data), previous)


def compute_block(read: _Read, *, job: PredictJob, predictor: Any = None) -> _Computed | Recorded:
    """The network over a block's tiles, blended and quantised to the output dtype; an unchanged `Recorded` when
    the block's earlier record shows it already holds what it would write now (same job, device class, input).

    `predictor` defaults to the job's network on this worker (found from the task's own thread); tests may pass any
    patch function instead (called once per patch, blended in NumPy)."""
    if predictor is None:
        from workers.plugin import worker_predictor

        predictor = worker_predictor(job.network)
    record = BlockRecord(f"{job.key}/{getattr(predictor, 'device_class', 'other')}", read.print)
    if read.previous == record:
        return Recorded(0, record, unchanged=True)
    raw: Any = job.input_checks.scale(read.data, read.source, read.read_roi)
    forward: PatchFn | Batched = predictor if job.tta == "none" else partial(predictor, tta=job.tta)
    batch_size = 1
    if isinstance(predictor, Predictor):
        batch_size = job.batch_size or predictor.batch_size
        if predictor.blend_on_device:
            raw = predictor.to_device(raw)  # once per block; the patches are slices of it on the device
        if batch_size > 1 or predictor.blend_on_device:
            forward = Batched(partial(predictor.batch, tta=job.tta))
    tile_fn = tile_forward(forward, job.median_size, job.tile_trim, getattr(predictor, "threads", 1))
    if isinstance(predictor, Predictor) and not isinstance(tile_fn, Batched):
        # tiles one by one on the CPU: the worker keeps them for the neighbouring blocks that need them too
        tile_fn = worker_tile_cache().wrap(tile_fn, f"{job.key}/{predictor.device_class}")
    probs = predict_region(raw, read.read_roi, read.block.write_roi, job.grid, tile_fn, job.blending, batch_size)
    return _Computed(read.block, to_output_dtype(probs, job.output_dtype), record)


def write_block(computed: _Computed, *, job: PredictJob) -> Recorded:
    """Write a block's valid region to every output; its value is the voxels written, with its record."""
    roi = computed.block.write_roi
    for n, url in enumerate(job.output_urls):
        _output(url, job.output_ids[n] if job.output_ids else "").write(roi, computed.data)
    return Recorded(int(roi.size), computed.record)


def block_stages(job: PredictJob, predictor: Any = None) -> BlockStages:
    """`predict_block` in its three stages, for `pipeline.execution.run_blockwise` to overlap I/O with compute."""
    return BlockStages(
        partial(read_block, job=job),
        partial(compute_block, job=job, predictor=predictor),
        partial(write_block, job=job),
    )


def predict_block(
    block: Block, previous: BlockRecord | None = None, *, job: PredictJob, predictor: Any = None
) -> Recorded:
    """Predict `block.write_roi` and write it to every output, unless `previous` shows it unchanged.

    Returns the number of voxels written with the block's record; `predictor` as in `compute_block`."""
    result: Recorded = block_stages(job, predictor)(block, previous)
    return result
