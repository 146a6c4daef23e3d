"""The network as a per-patch and a per-batch function, set up once per worker: device, precision, fast CPU layout."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from pipeline.network.tta import TTAMode, predict_probabilities

log = logging.getLogger(__name__)

BATCH_SIZE = {"cpu": 1, "cuda": 4}
"""Patches per network call when the job sets none: a GPU needs several to stay busy, a CPU gains nothing."""


def pick_device(requested: str = "auto") -> str:
    """`cuda` when asked for or available (and not refused), else `cpu`."""
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        from pipeline.errors import ModelLoadError

        raise ModelLoadError("device 'cuda' was requested but this worker has no CUDA device; use device: auto")
    return "cpu"


def auto_precision(device: str) -> str:
    """float16 autocast on a GPU; bfloat16 on a CPU with AMX matrix units, where it runs the network about 1.75x
    as fast as float32 at the same Jaccard (docs/benchmarks.md); float32 on other CPUs, where bfloat16 is emulated
    and about 3x slower."""
    import torch

    if device == "cuda":
        return "float16"
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return "bfloat16" if has_amx is not None and has_amx() else "float32"


def set_torch_threads() -> None:
    """Use the thread count the cluster assigned to this worker (MITOSEG_TORCH_THREADS), if any."""
    import torch

    threads = os.environ.get("MITOSEG_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


class Predictor:
    """Maps an input patch (C, Z, Y, X) to the cropped output probabilities (K, Z', Y', X'), or a batch of them.

    On a GPU the blocks are blended there (`blend_on_device`): a block's input goes to the device once
    (`to_device`), the patches are slices of it, and only the finished block comes back.
    """

    def __init__(self, checkpoint_path: str, device: str = "auto", precision: str = "auto", optimize: bool = True):
        import torch

        from pipeline.network.checkpoint import load_checkpoint

        set_torch_threads()
        self.threads = torch.get_num_threads()
        """CPU threads of this worker: torch's, and the median filter's (`pipeline.median_filter`)."""
        self.device = pick_device(device)
        loaded = load_checkpoint(checkpoint_path, device=self.device)
        self.checkpoint = loaded
        self.network = loaded.network.eval()
        self.context = tuple(int(c) for c in self.network.context)
        self.out_channels = int(loaded.network_config.out_channels)
        if precision == "auto":
            precision = auto_precision(self.device)
        self.device_class = f"{self.device}/{precision}"
        """Where and at which precision it runs: part of every block record, since both change the bytes."""
        self.autocast_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(precision)
        self.memory_format = torch.contiguous_format
        self.batch_size = BATCH_SIZE[self.device]
        """Patches per network call when the job sets none."""
        self.blend_on_device = self.device == "cuda"
        """Whether blocks are blended on this device (torch tensors) rather than in NumPy."""
        if optimize:
            self._optimize()

    def _optimize(self) -> None:
        """Fold batch norm into the convolutions and use channels-last 3D (1.5-2x on CPU; benchmarks/throughput.py).

        The folded network is checked against the original on a random patch and dropped if they differ.
        """
        import copy

        import torch

        fast = fold_batch_norm(copy.deepcopy(self.network)).to(memory_format=torch.channels_last_3d)
        probe = torch.rand((1, self.network.config.in_channels, *self.network.size_divisor), device=self.device)
        probe = torch.nn.functional.interpolate(probe, scale_factor=2)
        with torch.inference_mode():
            same = torch.allclose(
                fast(probe.contiguous(memory_format=torch.channels_last_3d)), self.network(probe), atol=1e-4, rtol=1e-3
            )
        if not same:
            log.warning("folding batch norm changed the network's output; running it unfolded")
            return
        self.network = fast
        self.memory_format = torch.channels_last_3d

    def _logits(self, batch: Any) -> Any:
        import torch

        batch = batch.contiguous(memory_format=self.memory_format)
        if self.autocast_dtype is None:
            return self.network(batch)
        with torch.autocast(self.device, dtype=self.autocast_dtype):
            return self.network(batch)

    def __call__(self, patch: np.ndarray, tta: TTAMode = "none") -> np.ndarray:
        """Probabilities of one patch, averaged over the test-time augmentation variants of `tta`."""
        return self.batch(patch[None], tta)[0]

    def batch(self, patches: Any, tta: TTAMode = "none") -> Any:
        """Probabilities of a batch (N, C, Z, Y, X) of patches, cropped by the context: a NumPy array for a NumPy
        batch, else a tensor on this device."""
        import torch

        with torch.inference_mode():
            if isinstance(patches, np.ndarray):
                x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).to(self.device)
            else:
                x = patches.to(self.device, torch.float32)
            probs = predict_probabilities(self._logits, x, tta)
            cz, cy, cx = self.context
            z, y, xx = probs.shape[2:]
            probs = probs[:, :, cz : z - cz, cy : y - cy, cx : xx - cx]
            return probs.cpu().numpy() if isinstance(patches, np.ndarray) else probs

    def to_device(self, array: np.ndarray) -> Any:
        """`array` as a tensor on this device; to a GPU through pinned memory, asynchronously (the network's kernels
        queue behind the copy on the same stream, so the host goes on at once)."""
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor


def fold_batch_norm(network: Any) -> Any:
    """Fold each eval-mode BatchNorm3d into the Conv3d registered just before it in the same parent module.

    In this project's networks such a pair is always applied in sequence; the caller verifies the result.
    """
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in list(network.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:], strict=False):
            if isinstance(conv, torch.nn.Conv3d) and isinstance(norm, torch.nn.BatchNorm3d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, norm_name, torch.nn.Identity())
    return network
