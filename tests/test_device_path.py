"""The GPU worker's path (batches, blending, median and quantisation on the device) run on the CPU: same output
as the plain path, block by block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import em_like, write_raw

from pipeline.config.segment import SegmentConfig
from pipeline.segment import prepare
from pipeline.volumes import open_volume
from workers.patch_predictor import Predictor
from workers.predict_block import predict_block

SHAPE = (12, 40, 44)  # two blocks, the second a partial one


@pytest.fixture(scope="module")
def raw_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("raw")
    return write_raw(f"zarr://file://{path}/em.zarr/raw", em_like(SHAPE, seed=5), chunks=(4, 8, 8))


def predict_all(raw_url: str, out: str, checkpoint: Path, predictor: Predictor, **settings: object) -> np.ndarray:
    """Every block of a job predicted by `predictor` (the network of `checkpoint`)."""
    config = SegmentConfig(
        input=raw_url,
        output=[out],
        checkpoint=checkpoint,
        block_size=(8, 40, 48),
        chunk_size=(4, 8, 8),
        margin=(2, 5, 5),  # the context (1, 4, 4) and the median's edge
        overlap=0.0,
        median_size=3,
        pyramid=False,
        **settings,
    )
    run = prepare(config)
    for block in run.plan.blocks():
        predict_block(block, job=run.job, predictor=predictor)
    volume = open_volume(out)
    return volume.read(volume.meta.roi)


def cpu_predictor(checkpoint: Path, on_device: bool) -> Predictor:
    """The tiny network on this CPU, blending in NumPy or, with `on_device`, as a GPU does (on CPU tensors)."""
    predictor = Predictor(str(checkpoint), device="cpu")
    predictor.blend_on_device = on_device
    return predictor


def test_device_path_writes_what_the_plain_path_writes(raw_url: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    plain = predict_all(
        raw_url, f"zarr://file://{tmp_path}/a.zarr/p", tiny_checkpoint, cpu_predictor(tiny_checkpoint, False)
    )
    device_path = cpu_predictor(tiny_checkpoint, True)
    device = predict_all(raw_url, f"zarr://file://{tmp_path}/b.zarr/p", tiny_checkpoint, device_path)
    assert plain.dtype == np.uint8 and plain.any()
    np.testing.assert_array_equal(device, plain)
    batched = predict_all(raw_url, f"zarr://file://{tmp_path}/c.zarr/p", tiny_checkpoint, device_path, batch_size=3)
    # a batch of 3 runs other CPU kernels than a batch of 1: the same probabilities to float rounding
    assert np.abs(batched.astype(int) - plain.astype(int)).max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_writes_what_the_cpu_writes_to_float16_rounding(raw_url: str, tiny_checkpoint: Path, tmp_path: Path):
    plain = predict_all(
        raw_url, f"zarr://file://{tmp_path}/a.zarr/p", tiny_checkpoint, cpu_predictor(tiny_checkpoint, False)
    )
    gpu = Predictor(str(tiny_checkpoint), device="cuda")
    assert gpu.blend_on_device and gpu.batch_size == 4
    found = predict_all(raw_url, f"zarr://file://{tmp_path}/g.zarr/p", tiny_checkpoint, gpu)
    assert np.abs(found.astype(int) - plain.astype(int)).max() <= 2
