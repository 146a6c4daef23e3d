"""Semantic evaluation of a prediction against ground truth, computed chunk by chunk.

The prediction is a probability volume written by `segment` (channel 0 = mitochondrion, uint8 scaled
by 255 or float in [0, 1]) or a label volume; in the truth any value > 0 is mitochondrion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from daisy import Roi

from pipeline.errors import GeometryError
from pipeline.geometry import Vec3, chunk_rois, parse_roi, roi_key
from pipeline.volumes.base import Volume

logger = logging.getLogger(__name__)


@dataclass
class SemanticCounts:
    """Confusion counts of the foreground class; adds up across chunks."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: SemanticCounts) -> SemanticCounts:
        return SemanticCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def jaccard(self) -> float:
        """Foreground IoU (1 when both masks are empty)."""
        return _agreement(self.tp, self.fp + self.fn)

    @property
    def dice(self) -> float:
        """Dice coefficient (F1) of the foreground (1 when both masks are empty)."""
        return _agreement(2 * self.tp, self.fp + self.fn)

    @property
    def background_jaccard(self) -> float:
        return _agreement(self.tn, self.fp + self.fn)

    @property
    def miou(self) -> float:
        """Mean IoU of foreground and background."""
        return (self.jaccard + self.background_jaccard) / 2

    def scores(self) -> dict[str, float]:
        return {"jaccard": self.jaccard, "dice": self.dice, "miou": self.miou}


def _agreement(agree: int, disagree: int) -> float:
    """agree / (agree + disagree): an IoU or Dice from its counts; 1 when both are 0 (two empty masks agree)."""
    total = agree + disagree
    return agree / total if total else 1.0


def count(prediction: np.ndarray, truth: np.ndarray) -> SemanticCounts:
    """Counts for two boolean arrays of the same shape."""
    pred, true = prediction.astype(bool), truth.astype(bool)
    tp = int(np.count_nonzero(pred & true))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(true)) - tp
    return SemanticCounts(tp, fp, fn, pred.size - tp - fp - fn)


def binarise(values: np.ndarray, threshold: float, kind: str = "probability") -> np.ndarray:
    """Foreground mask of a prediction chunk: probabilities (uint8 = p x 255, or float) at `threshold`,
    or a label volume (`kind="label"`, any value > 0)."""
    if kind == "label":
        return values > 0
    if values.dtype == np.uint8:
        return values >= threshold * 255.0
    return values >= threshold


def prediction_kind(volume: Volume, chunks: Vec3) -> str:
    """'probability' or 'label' for a prediction volume.

    Floats are probabilities, integers other than uint8 are labels. uint8 is a probability map (x 255)
    when `segment` recorded provenance on it; otherwise one chunk-by-chunk pass decides: a volume whose
    values are all 0 or 1 is a mask, anything else a probability map.
    """
    dtype = np.dtype(volume.meta.dtype)
    if np.issubdtype(dtype, np.floating):
        return "probability"
    if dtype != np.uint8:
        return "label"
    if "checkpoint_hash" in (volume.provenance or {}):
        return "probability"
    for roi in chunk_rois(volume.meta.roi, chunks):
        if volume.read(roi)[0].max() > 1:
            return "probability"
    return "label"


def evaluation_region(volume: Volume, roi: Roi | None) -> Roi:
    """The region to score: `roi`, else the one `segment` recorded in the prediction's provenance, else all.

    Voxels outside the region a run predicted hold no prediction, so they must not count as misses.
    """
    whole = volume.meta.roi
    recorded = volume.provenance.get("roi") if isinstance(volume.provenance, dict) else None
    region = roi or (parse_roi(recorded) if isinstance(recorded, str) else whole)
    if not whole.contains(region):
        raise GeometryError(
            f"evaluation region {roi_key(region)} reaches outside {volume.url} (shape {tuple(volume.meta.shape)}); "
            "give --roi OFFSET:SHAPE inside the volume"
        )
    return region


def default_threshold(provenance: dict) -> float:
    """The threshold a prediction's provenance records (from its checkpoint), else 0.5."""
    value = provenance.get("threshold") if isinstance(provenance, dict) else None
    return float(value) if isinstance(value, int | float) else 0.5


def evaluate_semantic(
    prediction_url: str,
    truth_url: str,
    threshold: float | None = None,
    *,
    kind: str = "auto",
    chunks: Vec3 | None = None,
    roi: Roi | None = None,
    ignore_label: int | None = None,
) -> dict[str, float]:
    """Jaccard, Dice and mean IoU of a prediction volume against a truth volume, chunk by chunk.

    Without `threshold`, the one recorded in the prediction's provenance is used, else 0.5. `kind` is
    'probability', 'label' or 'auto' (see `prediction_kind`). Only `evaluation_region(prediction, roi)` counts,
    and of it only voxels whose truth is not `ignore_label` (sparse annotations mark unlabelled voxels so).
    Returns {"jaccard", "dice", "miou", "threshold"}.
    """
    from pipeline.volumes import open_volume

    pred_vol, truth_vol = open_volume(prediction_url), open_volume(truth_url)
    pred_vol.require_complete("evaluating it")
    if tuple(pred_vol.meta.shape) != tuple(truth_vol.meta.shape):
        raise GeometryError(
            f"prediction {prediction_url} has shape {tuple(pred_vol.meta.shape)} but truth {truth_url} has "
            f"{tuple(truth_vol.meta.shape)}: compare volumes of the same shape"
        )
    if threshold is None:
        threshold = default_threshold(pred_vol.provenance)
    grid = chunks or pred_vol.meta.chunks
    if kind == "auto":
        kind = prediction_kind(pred_vol, grid)
    region = evaluation_region(pred_vol, roi)
    total = SemanticCounts()
    for part in chunk_rois(region, grid):
        pred = binarise(pred_vol.read(part)[0], threshold, kind)
        truth = truth_vol.read(part)[0]
        if ignore_label is not None:
            labelled = truth != ignore_label
            pred, truth = pred[labelled], truth[labelled]
        total = total + count(pred, truth > 0)
    return {**total.scores(), "threshold": float(threshold)}


def evaluate_all(
    prediction_url: str,
    truth_url: str,
    threshold: float | None = None,
    kind: str = "auto",
    roi: Roi | None = None,
    ignore_label: int | None = None,
) -> dict[str, float]:
    """Semantic scores, plus AP-50/AP-75 and object precision/recall when the prediction holds instance labels,
    over `evaluation_region(prediction, roi)`; with `ignore_label` (sparse truth) the semantic scores only, over
    the labelled voxels (objects cannot be matched against partly labelled truth)."""
    from pipeline.instance_metrics import instance_scores, is_label_volume
    from pipeline.volumes import open_volume

    region = evaluation_region(open_volume(prediction_url), roi)
    scores = evaluate_semantic(prediction_url, truth_url, threshold, kind=kind, roi=region, ignore_label=ignore_label)
    if ignore_label is None and is_label_volume(prediction_url):
        scores.update(instance_scores(prediction_url, truth_url, roi=region))
    return scores
