"""Validation: sliding-window prediction with Gaussian blending, and threshold tuning from histograms."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.evaluation import SemanticCounts, count
from pipeline.stitching import axis_starts
from pipeline.tta import TTAMode, predict_probabilities

_BINS = 200


def _gaussian(core: tuple[int, int, int]) -> np.ndarray:
    axes = []
    for n in core:
        x = np.arange(n) - (n - 1) / 2
        axes.append(np.exp(-0.5 * (x / max(n / 4, 1e-3)) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


@torch.no_grad()
def predict_volume(
    network: torch.nn.Module,
    raw: np.ndarray,
    patch_shape: tuple[int, int, int],
    context: tuple[int, int, int],
    overlap: float = 0.25,
    device: torch.device | str = "cpu",
    tta: TTAMode = "none",
) -> np.ndarray:
    """Probabilities (K, Z, Y, X) of a uint8 (Z, Y, X) volume: patches with overlap, context cropped,
    Gaussian-weighted blending, test-time augmentation `tta`; borders mirrored. The network must be in eval mode."""
    core = tuple(p - 2 * c for p, c in zip(patch_shape, context, strict=True))
    stride = tuple(max(1, int(round(c * (1 - overlap)))) for c in core)
    out_shape = tuple(max(s, c) for s, c in zip(raw.shape, core, strict=True))
    pad = [(c, c + o - s) for c, o, s in zip(context, out_shape, raw.shape, strict=True)]
    padded = np.pad(raw, pad, mode="reflect")  # as `segment` mirrors volume borders (no edge repeat)
    weight = _gaussian(core)  # type: ignore[arg-type]
    acc = None
    norm = np.zeros(out_shape, dtype=np.float32)
    grid = [axis_starts(o, c, s) for o, c, s in zip(out_shape, core, stride, strict=True)]
    for z in grid[0]:
        for y in grid[1]:
            for x in grid[2]:
                patch = padded[z : z + patch_shape[0], y : y + patch_shape[1], x : x + patch_shape[2]]
                tensor = torch.from_numpy(patch.astype(np.float32) / 255.0)[None, None].to(device)
                prob = predict_probabilities(network, tensor, tta)[0].cpu().numpy()
                prob = prob[
                    :,
                    context[0] : context[0] + core[0],
                    context[1] : context[1] + core[1],
                    context[2] : context[2] + core[2],
                ]
                if acc is None:
                    acc = np.zeros((prob.shape[0], *out_shape), dtype=np.float32)
                box = (slice(z, z + core[0]), slice(y, y + core[1]), slice(x, x + core[2]))
                acc[(slice(None), *box)] += prob * weight
                norm[box] += weight
    acc /= norm  # type: ignore[operator]
    return acc[:, : raw.shape[0], : raw.shape[1], : raw.shape[2]]


class ThresholdTuner:
    """Histograms of mask probabilities on foreground and background voxels; best threshold by Jaccard."""

    def __init__(self) -> None:
        self.fg = np.zeros(_BINS, dtype=np.int64)
        self.bg = np.zeros(_BINS, dtype=np.int64)

    def update(self, prob: np.ndarray, truth: np.ndarray) -> None:
        bins = np.clip((prob * _BINS).astype(np.int64), 0, _BINS - 1)
        is_fg = truth > 0
        self.fg += np.bincount(bins[is_fg], minlength=_BINS)
        self.bg += np.bincount(bins[~is_fg], minlength=_BINS)

    def counts(self, threshold: float) -> SemanticCounts:
        """Counts when `prob >= threshold` (threshold on the bin grid) is foreground."""
        cut = int(round(threshold * _BINS))
        tp, fp = int(self.fg[cut:].sum()), int(self.bg[cut:].sum())
        fn, tn = int(self.fg[:cut].sum()), int(self.bg[:cut].sum())
        return SemanticCounts(tp, fp, fn, tn)

    def best(self, low: float = 0.05, high: float = 0.99) -> tuple[float, SemanticCounts]:
        """The threshold in [low, high] with the highest Jaccard, and its counts."""
        candidates = [c / _BINS for c in range(int(low * _BINS), int(high * _BINS) + 1)]
        scored = [(self.counts(t).jaccard, t) for t in candidates]
        _, threshold = max(scored)
        return threshold, self.counts(threshold)


def score_checkpoint(
    path: str,
    raw: np.ndarray,
    label: np.ndarray,
    overlap: float = 0.25,
    threshold: float | None = None,
    tta: TTAMode = "none",
    median_size: int | None = None,
) -> dict[str, float]:
    """Scores of a checkpoint on a (raw, label) volume, predicted as `segment` runs it: its recommended patch
    shape, Gaussian blending, test-time augmentation `tta`, a `median_size` median filter (the checkpoint's
    recommendation unless given) and its threshold unless given."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.smoothing import median_filter

    loaded = load_checkpoint(path)
    prob = predict_volume(loaded.network, raw, loaded.patch_shape, loaded.network.context, overlap, tta=tta)
    prob = median_filter(prob, loaded.median_size if median_size is None else median_size)
    cut = loaded.threshold if threshold is None else threshold
    return {**count(prob[0] >= cut, label > 0).scores(), "threshold": cut}
