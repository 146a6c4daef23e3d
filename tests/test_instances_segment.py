"""The instance stage reads what `segment` writes: uint8 probabilities, its threshold, its pyramid."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from conftest import em_like, write_raw

from pipeline.config.instances import InstancesConfig
from pipeline.config.segment import SegmentConfig
from pipeline.instances.run import run_instances
from pipeline.segment import segment
from pipeline.volumes import open_volume

pytestmark = pytest.mark.cluster


def test_instances_of_a_segment_output(tmp_path, tiny_checkpoint):
    from pipeline.cluster import dask_client
    from pipeline.config.cluster import LocalClusterConfig

    raw = write_raw(f"zarr://file://{tmp_path}/em.zarr/raw", em_like((16, 48, 48)))
    probs = f"zarr://file://{tmp_path}/prediction.zarr/probs"
    seg_cfg = SegmentConfig(
        input=raw, output=[probs], checkpoint=tiny_checkpoint, chunk_size=(8, 16, 16), block_size=(16, 32, 32)
    )
    with dask_client(LocalClusterConfig(workers=1)) as client:
        assert segment(seg_cfg, client=client, progress=False).run.ok
        source = open_volume(probs)
        threshold = source.provenance["threshold"]
        mask = source.read(source.meta.roi)[0].astype(np.float32) / np.float32(255) > threshold
        cfg = InstancesConfig(
            input=probs,
            output=f"{tmp_path}/instances.zarr",
            block_size=(8, 16, 32),
            decode={"min_size": 0, "seed_threshold": 0.0},  # every component, as the oracle below
        )
        result = run_instances(cfg, client, progress=False)
    assert result.ok and result.decode.total == 12
    labels = open_volume(cfg.output).read(open_volume(cfg.output).meta.roi)[0]
    oracle = cc3d.connected_components(mask, connectivity=6)
    assert len(np.unique(labels)) == len(np.unique(oracle)) > 1
    pairs = np.unique(np.stack([labels[mask], oracle[mask]], axis=1), axis=0)
    assert np.array_equal(labels > 0, mask) and len(pairs) == len(np.unique(oracle)) - 1
    assert open_volume(cfg.output).meta.voxel_size_nm == source.meta.voxel_size_nm
    assert open_volume(cfg.output, scale=1).meta.shape[0] <= labels.shape[0]  # the viewing pyramid was added
