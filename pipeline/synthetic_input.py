"""The demo's input: a synthetic EM volume (and its truth) written where a job expects its input."""

from __future__ import annotations

import logging

import numpy as np

from pipeline.config.segment import SegmentConfig
from pipeline.volumes import VolumeMeta, create_volume, volume_exists

log = logging.getLogger(__name__)


def ensure_synthetic_input(config: SegmentConfig) -> bool:
    """Generate the job's synthetic input when it asks for one and the input is absent; True if generated."""
    spec = config.synthetic
    if spec is None or volume_exists(config.input):
        return False
    from pipeline.synthetic import generate_volume

    log.info("input %s is absent: generating a synthetic EM volume %s (seed %d)", config.input, spec.shape, spec.seed)
    raw, label = generate_volume(spec.shape, seed=spec.seed)
    chunks = tuple(min(c, s) for c, s in zip(config.chunk_size, spec.shape, strict=True))
    meta = VolumeMeta(shape=spec.shape, dtype=np.dtype(np.uint8), chunks=chunks, voxel_size_nm=spec.voxel_size_nm)  # type: ignore[arg-type]
    create_volume(config.input, meta).write(meta.roi, raw[None])
    if spec.truth:
        create_volume(spec.truth, meta.derive(layer_type="segmentation")).write(meta.roi, label[None])
    return True
