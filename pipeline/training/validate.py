"""Validation: sliding-window prediction as `segment` runs it, and threshold tuning from histograms."""

from __future__ import annotations

import numpy as np
import torch
from daisy import Roi

from pipeline.config.train import TrainConfig
from pipeline.evaluation import SemanticCounts, count
from pipeline.network.inputs import scale_input
from pipeline.network.model import ResUNet
from pipeline.network.tta import TTAMode, predict_probabilities
from pipeline.stitching import PatchGrid, predict_region, read_mirrored, tile_forward
from pipeline.training.data import LabelledRegion
from pipeline.training.targets import IGNORE

_BINS = 200


@torch.no_grad()
def predict_volume(
    network: torch.nn.Module,
    raw: np.ndarray,
    patch_shape: tuple[int, int, int],
    context: tuple[int, int, int],
    overlap: float | tuple[float, float, float] = 0.25,
    device: torch.device | str = "cpu",
    tta: TTAMode = "none",
    margin: tuple[int, int, int] | None = None,
    median_size: int = 0,
) -> np.ndarray:
    """Probabilities (K, Z, Y, X) of a uint8 (Z, Y, X) volume in memory, predicted as `segment` predicts a volume
    (its patch grid, mirror padding, each tile median-filtered and cut to `margin` (default: the network's
    `context`), Gaussian blending; `pipeline.stitching`), with test-time augmentation `tta`. The network must be
    in eval mode."""
    margin = margin or context
    grid = PatchGrid.with_overlap(patch_shape, margin, overlap, raw.shape)
    whole = Roi((0, 0, 0), raw.shape)
    read_roi = grid.read_roi(whole)
    padded = read_mirrored(lambda roi: raw[None][(slice(None), *roi.to_slices())], read_roi, raw.shape)
    crop = (slice(None), *(slice(c, p - c) for c, p in zip(context, patch_shape, strict=True)))

    def forward(patch: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(scale_input(patch))[None].to(device)
        return predict_probabilities(network, tensor, tta)[0].cpu().numpy()[crop]

    trim = tuple(m - c for m, c in zip(margin, context, strict=True))
    return predict_region(padded, read_roi, whole, grid, tile_forward(forward, median_size, trim))  # type: ignore[arg-type]


class ThresholdTuner:
    """Histograms of mask probabilities on foreground and background voxels; best threshold by Jaccard."""

    def __init__(self) -> None:
        self.fg = np.zeros(_BINS, dtype=np.int64)
        self.bg = np.zeros(_BINS, dtype=np.int64)

    def update(self, prob: np.ndarray, truth: np.ndarray, annotated: np.ndarray | None = None) -> None:
        """Count `prob` against `truth` (> 0 foreground) where the boolean `annotated` is True (None: everywhere)."""
        if annotated is not None:
            prob, truth = prob[annotated], truth[annotated]
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


def validate(
    network: ResUNet, regions: list[LabelledRegion], cfg: TrainConfig, device: torch.device
) -> tuple[float, dict[str, float]]:
    """Tuned threshold and scores (jaccard, dice, miou) over the annotated voxels of all validation regions."""
    was_training = network.training
    network.eval()
    tuner = ThresholdTuner()
    for region in regions:
        prob = predict_volume(network, region.raw, cfg.val_patch_shape, network.context, cfg.val_overlap, device)
        annotated = region.label != IGNORE
        tuner.update(prob[0], region.label, None if annotated.all() else annotated)
    network.train(was_training)
    threshold, counts = tuner.best()
    return threshold, {**counts.scores(), "jaccard@0.5": tuner.counts(0.5).jaccard}


def score_checkpoint(
    path: str,
    raw: np.ndarray,
    label: np.ndarray,
    overlap: float | None = None,
    threshold: float | None = None,
    tta: TTAMode = "none",
    median_size: int | None = None,
) -> dict[str, float]:
    """Scores of a checkpoint on a (raw, label) volume, predicted as `segment` runs it: its recommended patch
    shape, margin and overlap (unless given), Gaussian blending, test-time augmentation `tta`, a `median_size`
    median filter in each tile and its threshold (the checkpoint's recommendations unless given)."""
    from pipeline.network.checkpoint import load_checkpoint

    loaded = load_checkpoint(path)
    prob = predict_volume(
        loaded.network,
        raw,
        loaded.patch_shape,
        loaded.network.context,
        loaded.overlap if overlap is None else overlap,
        tta=tta,
        margin=loaded.margin,
        median_size=loaded.median_size if median_size is None else median_size,
    )
    cut = loaded.threshold if threshold is None else threshold
    return {**count(prob[0] >= cut, label > 0).scores(), "threshold": cut}
