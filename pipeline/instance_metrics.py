"""Instance metrics: AP-50 and AP-75 as in the MitoEM challenge, object precision and recall.

Objects are matched by 3D IoU. For AP, predictions are ranked by size (largest first, the score MitoEM uses
for label volumes) and each takes the unmatched truth object of highest IoU at or above the threshold, as in
COCO; AP is the mean interpolated precision at the 101 recall points 0, 0.01, ..., 1. Precision and recall
count one-to-one matches at IoU >= 0.5 among all predicted and all true objects.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from daisy import Roi

from pipeline.errors import ConfigError, GeometryError

RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass
class Overlaps:
    """Object sizes of both label volumes and the voxel counts of every intersecting pair."""

    pred_sizes: Counter[int]
    truth_sizes: Counter[int]
    intersections: Counter[tuple[int, int]]

    @classmethod
    def empty(cls) -> Overlaps:
        return cls(Counter(), Counter(), Counter())

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Accumulate one pair of aligned label arrays (any shape; 0 = background)."""
        if pred.shape != truth.shape:
            raise GeometryError(f"prediction of shape {pred.shape} and truth of shape {truth.shape} do not align")
        p, t = pred.ravel(), truth.ravel()
        for sizes, labels in ((self.pred_sizes, p), (self.truth_sizes, t)):
            ids, counts = np.unique(labels[labels != 0], return_counts=True)
            sizes.update(dict(zip(ids.tolist(), counts.tolist(), strict=True)))
        both = (p != 0) & (t != 0)
        if both.any():
            pairs, counts = np.unique(np.stack([p[both], t[both]], axis=1), axis=0, return_counts=True)
            self.intersections.update({(int(a), int(b)): int(c) for (a, b), c in zip(pairs, counts, strict=True)})

    def ious(self) -> dict[tuple[int, int], float]:
        """IoU of every intersecting (prediction, truth) pair."""
        return {(a, b): n / (self.pred_sizes[a] + self.truth_sizes[b] - n) for (a, b), n in self.intersections.items()}


def _ranked_predictions(overlaps: Overlaps) -> list[int]:
    """Predictions by decreasing size, ties by increasing ID."""
    return sorted(overlaps.pred_sizes, key=lambda i: (-overlaps.pred_sizes[i], i))


def greedy_matches(overlaps: Overlaps, threshold: float) -> list[tuple[int, int | None]]:
    """Each prediction in rank order with the truth object it matches at IoU >= threshold (None = false positive)."""
    candidates: dict[int, list[tuple[float, int]]] = {}
    for (a, b), iou in overlaps.ious().items():
        if iou >= threshold:
            candidates.setdefault(a, []).append((iou, b))
    taken: set[int] = set()
    out: list[tuple[int, int | None]] = []
    for pred in _ranked_predictions(overlaps):
        best = None
        for _, truth in sorted(candidates.get(pred, []), key=lambda c: (-c[0], c[1])):
            if truth not in taken:
                best = truth
                break
        if best is not None:
            taken.add(best)
        out.append((pred, best))
    return out


def average_precision(overlaps: Overlaps, threshold: float) -> float:
    """COCO-style 101-point interpolated AP at one IoU threshold (NaN without true objects)."""
    num_truth = len(overlaps.truth_sizes)
    if num_truth == 0:
        return float("nan")
    hits = np.array([truth is not None for _, truth in greedy_matches(overlaps, threshold)], dtype=bool)
    if hits.size == 0:
        return 0.0
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    recall = tp / num_truth
    precision = tp / (tp + fp)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, RECALL_POINTS, side="left")
    values = np.where(index < len(precision), precision[np.minimum(index, len(precision) - 1)], 0.0)
    return float(values.mean())


def scores_from_overlaps(overlaps: Overlaps) -> dict[str, float]:
    """AP-50, AP-75, and object precision, recall and F1 at IoU 0.5, with the object counts."""
    num_pred, num_truth = len(overlaps.pred_sizes), len(overlaps.truth_sizes)
    matched = sum(truth is not None for _, truth in greedy_matches(overlaps, 0.5))
    precision = matched / num_pred if num_pred else float("nan")
    recall = matched / num_truth if num_truth else float("nan")
    f1 = 2 * matched / (num_pred + num_truth) if num_pred + num_truth else float("nan")
    return {
        "ap50": average_precision(overlaps, 0.5),
        "ap75": average_precision(overlaps, 0.75),
        "object_precision": precision,
        "object_recall": recall,
        "object_f1": f1,
        "num_predicted": float(num_pred),
        "num_truth": float(num_truth),
        "num_matched": float(matched),
    }


def instance_scores_arrays(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Instance scores of two in-memory label arrays of the same shape."""
    overlaps = Overlaps.empty()
    overlaps.add(np.asarray(prediction), np.asarray(truth))
    return scores_from_overlaps(overlaps)


def _slabs(begin: int, end: int, depth: int) -> Iterable[tuple[int, int]]:
    for z in range(begin, end, depth):
        yield z, min(z + depth, end)


def instance_scores(
    prediction_url: str,
    truth_url: str,
    truth_components: bool | None = None,
    slab_voxels: int = 2**26,
    roi: Roi | None = None,
) -> dict[str, float]:
    """Instance scores of a predicted label volume against a true one, read in z-slabs (bounded memory),
    over `roi` (default the whole volume; objects it cuts count as the parts inside).

    Both must be single-channel integer volumes of the same shape; keys as `scores_from_overlaps`. A truth
    that is a binary mask (only 0 and 1, e.g. the synthetic demo's) has no instances of its own: with
    `truth_components` (None = when the truth is binary) its 6-connected components are the true objects,
    labelled in memory.
    """
    import cc3d

    from pipeline.volumes import open_volume

    pred, truth = open_volume(prediction_url), open_volume(truth_url)
    for volume in (pred, truth):
        meta = volume.meta
        if not np.issubdtype(meta.dtype, np.integer) or meta.num_channels != 1:
            raise ConfigError(
                f"{volume.url} holds {meta.num_channels} channel(s) of {meta.dtype}; instance scores need one "
                "channel of integer labels"
            )
    if pred.meta.shape != truth.meta.shape:
        raise GeometryError(
            f"prediction {pred.url} has shape {pred.meta.shape} but truth {truth.url} has {truth.meta.shape}; "
            "both must cover the same voxels"
        )
    region = roi or truth.meta.roi
    depth = max(1, slab_voxels // (region.shape[1] * region.shape[2]))
    slabs = [
        Roi((z0, *region.begin[1:]), (z1 - z0, *region.shape[1:]))
        for z0, z1 in _slabs(region.begin[0], region.end[0], depth)
    ]
    if truth_components is None:
        truth_components = all(int(truth.read(slab).max()) <= 1 for slab in slabs)
    labelled = None
    if truth_components:
        labelled = cc3d.connected_components(truth.read(region)[0] > 0, connectivity=6)
    overlaps = Overlaps.empty()
    for slab in slabs:
        true_labels = truth.read(slab)[0] if labelled is None else labelled[(slab - region.offset).to_slices()]
        overlaps.add(pred.read(slab)[0], true_labels)
    return scores_from_overlaps(overlaps)


def is_label_volume(url: str) -> bool:
    """Whether a volume holds instance labels (a segmentation layer, or integers wider than uint8 probabilities)."""
    from pipeline.volumes import open_volume

    meta = open_volume(url).meta
    integer = np.issubdtype(meta.dtype, np.integer)
    return integer and (meta.layer_type == "segmentation" or meta.dtype.itemsize >= 4)
