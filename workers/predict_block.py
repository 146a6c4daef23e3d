"""Per-block prediction inside a Dask worker: read with mirror padding, blend patches, write the valid region."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

from daisy import Block, Roi

from pipeline.median_filter import median_filter, median_margin
from pipeline.network.inputs import scale_input
from pipeline.network.tta import TTAMode
from pipeline.stitching import Blending, PatchGrid, predict_region, read_mirrored, to_output_dtype
from pipeline.volumes import Volume, open_volume


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


@lru_cache(maxsize=16)
def _open(url: str, mode: str) -> Volume:
    """Volumes stay open for the life of the worker process: opening costs a metadata read."""
    return open_volume(url, mode=mode)


def predict_block(block: Block, job: PredictJob, predictor: Any = None) -> int:
    """Predict `block.write_roi` and write it to every output; return the number of voxels written.

    `predictor` defaults to the worker's network; tests may pass any patch function instead.
    """
    if predictor is None:
        from workers.plugin import worker_predictor

        predictor = worker_predictor()
    source = _open(job.input_url, "r")
    # a median filter needs predictions around the block: predict a larger region (inside the volume, so the
    # filter sees what it would see on the whole volume) and keep the block
    margin = median_margin(job.median_size)
    region = block.write_roi.grow((margin,) * 3, (margin,) * 3).intersect(Roi((0, 0, 0), job.volume_shape))
    read_roi = job.grid.read_roi(region)
    raw = scale_input(read_mirrored(source.read, read_roi, job.volume_shape))
    patch_fn = predictor if job.tta == "none" else partial(predictor, tta=job.tta)
    probs = median_filter(predict_region(raw, read_roi, region, job.grid, patch_fn, job.blending), job.median_size)
    inner = block.write_roi - region.offset
    probs = probs[(slice(None), *inner.to_slices())]
    data = to_output_dtype(probs, job.output_dtype)
    for url in job.output_urls:
        _open(url, "r+").write(block.write_roi, data)
    return int(block.write_roi.size)
