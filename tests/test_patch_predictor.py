"""The per-worker predictor: fast CPU layout equals the plain network, batches, devices and precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import ModelLoadError
from pipeline.network.inputs import scale_input
from workers.patch_predictor import Predictor, auto_precision, fold_batch_norm, pick_device


def test_folded_channels_last_network_matches_the_plain_one(tiny_checkpoint) -> None:
    plain = Predictor(str(tiny_checkpoint), device="cpu", precision="float32", optimize=False)
    fast = Predictor(str(tiny_checkpoint), device="cpu", precision="float32", optimize=True)
    assert fast.memory_format == torch.channels_last_3d
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fast.network.modules())
    patch = np.random.default_rng(0).random((1, 8, 32, 32), dtype=np.float32)
    a, b = plain(patch), fast(patch)
    assert a.shape == b.shape == (1, 6, 24, 24)  # cropped by the context (1, 4, 4) per side
    assert np.abs(a - b).max() < 1e-4 and a.min() >= 0.0 and a.max() <= 1.0


def test_a_batch_equals_its_patches_one_by_one_and_tensors_stay_tensors(tiny_checkpoint) -> None:
    predictor = Predictor(str(tiny_checkpoint), device="cpu")
    assert predictor.batch_size == 1 and not predictor.blend_on_device  # the CPU defaults
    patches = np.random.default_rng(2).random((3, 1, 8, 32, 32), dtype=np.float32)
    batch = predictor.batch(patches)
    assert isinstance(batch, np.ndarray) and batch.shape == (3, 1, 6, 24, 24)
    one_by_one = np.stack([predictor(p) for p in patches])
    assert np.abs(batch - one_by_one).max() < 1e-5  # the same network; kernels may round otherwise per batch size
    on_device = predictor.to_device(patches)
    assert isinstance(on_device, torch.Tensor) and np.array_equal(on_device.numpy(), patches)
    found = predictor.batch(on_device)
    assert isinstance(found, torch.Tensor) and np.array_equal(found.numpy(), batch)


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_is_bfloat16_only_on_cpus_with_amx(monkeypatch, tiny_checkpoint, amx) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert auto_precision("cuda") == "float16"
    predictor = Predictor(str(tiny_checkpoint), device="cpu")
    assert predictor.device_class == ("cpu/bfloat16" if amx else "cpu/float32")
    assert predictor.autocast_dtype == (torch.bfloat16 if amx else None)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probe: float32
    assert auto_precision("cpu") == "float32"


def test_cpu_bfloat16_stays_close_to_float32(tiny_checkpoint) -> None:
    full = Predictor(str(tiny_checkpoint), device="cpu", precision="float32")
    half = Predictor(str(tiny_checkpoint), device="cpu", precision="bfloat16")
    patch = np.random.default_rng(3).random((1, 8, 32, 32), dtype=np.float32)
    a, b = full(patch), half(patch)
    assert b.dtype == np.float32 and 0 < np.abs(a - b).max() < 2e-2


def test_fold_batch_norm_leaves_other_modules_alone() -> None:
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2), torch.nn.ELU()).eval()
    net[1].running_mean.fill_(0.3)
    net[1].running_var.fill_(2.0)
    x = torch.rand(1, 1, 5, 5, 5)
    expected = net(x)
    folded = fold_batch_norm(net)
    assert isinstance(folded[1], torch.nn.Identity) and isinstance(folded[2], torch.nn.ELU)
    assert torch.allclose(folded(x), expected, atol=1e-6)


def test_inputs_are_scaled_to_unit_range() -> None:
    assert scale_input(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    assert scale_input(np.array([65535], np.uint16)).tolist() == [1.0]
    assert scale_input(np.array([0.25], np.float32)).tolist() == [0.25]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_a_clear_error() -> None:
    assert pick_device("auto") == "cpu"
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        pick_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_float16_matches_cpu_float32(tiny_checkpoint) -> None:
    cpu = Predictor(str(tiny_checkpoint), device="cpu")
    gpu = Predictor(str(tiny_checkpoint), device="cuda", precision="auto")
    assert gpu.device == "cuda" and gpu.autocast_dtype == torch.float16
    patch = np.random.default_rng(1).random((1, 8, 32, 32), dtype=np.float32)
    assert np.abs(cpu(patch) - gpu(patch)).max() < 1e-2
    assert gpu.blend_on_device and gpu.batch_size == 4
    patches = np.stack([patch, patch[:, ::-1].copy()])
    on_gpu = gpu.batch(gpu.to_device(patches))  # through pinned memory, asynchronously
    assert on_gpu.device.type == "cuda" and np.abs(on_gpu.cpu().numpy() - cpu.batch(patches)).max() < 1e-2
