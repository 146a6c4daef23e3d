"""The network as a per-patch function, set up once per worker: device, precision, fast CPU layout."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from pipeline.network.tta import TTAMode, predict_probabilities

log = logging.getLogger(__name__)


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


def set_torch_threads() -> None:
    """Use the thread count the cluster assigned to this worker (MITOSEG_TORCH_THREADS), if any."""
    import torch

    threads = os.environ.get("MITOSEG_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


class Predictor:
    """Maps an input patch (C, Z, Y, X) to the cropped output probabilities (K, Z', Y', X')."""

    def __init__(self, checkpoint_path: str, device: str = "auto", precision: str = "auto", optimize: bool = True):
        import torch

        from pipeline.network.checkpoint import load_checkpoint

        set_torch_threads()
        self.device = pick_device(device)
        loaded = load_checkpoint(checkpoint_path, device=self.device)
        self.checkpoint = loaded
        self.network = loaded.network.eval()
        self.context = tuple(int(c) for c in self.network.context)
        self.out_channels = int(loaded.network_config.out_channels)
        if precision == "auto":
            precision = "float16" if self.device == "cuda" else "float32"
        self.device_class = f"{self.device}/{precision}"
        """Where and at which precision it runs: part of every block record, since both change the bytes."""
        self.autocast_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(precision)
        self.memory_format = torch.contiguous_format
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
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(patch, dtype=np.float32))[None].to(self.device)
            probs = predict_probabilities(self._logits, x, tta)
            cz, cy, cx = self.context
            z, y, xx = probs.shape[2:]
            return probs[0, :, cz : z - cz, cy : y - cy, cx : xx - cx].cpu().numpy()


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
