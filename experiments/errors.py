"""Where a prediction is wrong: Jaccard by distance to the volume's faces (per axis), and the predicted objects that
touch no labelled voxel. A report on data already scored; it chooses nothing.

Run: python experiments/errors.py PREDICTION_ZARR_ARRAY TRUTH_ZARR_ARRAY [THRESHOLD]
e.g. python experiments/errors.py runs/test_left/probs.zarr/s0 ../shared/data/lucchi/test_left.zarr/label 0.46
"""

from __future__ import annotations

import sys

import cc3d
import numpy as np
import zarr

from pipeline.evaluation import binarise, count

BANDS = (0, 8, 16, 32, 64, 10**9)
MIN_OBJECT = 500


def bands(mask: np.ndarray, truth: np.ndarray) -> None:
    """Per axis, the score of the slabs at each distance band from that axis's two faces."""
    for axis, name in enumerate("zyx"):
        n = mask.shape[axis]
        distance = np.minimum(np.arange(n), n - 1 - np.arange(n))
        cells = []
        for low, high in zip(BANDS[:-1], BANDS[1:], strict=True):
            rows = (distance >= low) & (distance < high)
            counts = count(np.compress(rows, mask, axis=axis), np.compress(rows, truth, axis=axis))
            cells.append(
                f"[{low},{min(high, n)}): J {counts.jaccard:.3f} p {counts.tp / max(counts.tp + counts.fp, 1):.2f} "
                f"r {counts.tp / max(counts.tp + counts.fn, 1):.2f}"
            )
        print(f"{name}: " + " | ".join(cells))


def unlabelled_objects(mask: np.ndarray, truth: np.ndarray) -> None:
    """Predicted objects of at least MIN_OBJECT voxels that overlap no labelled voxel, and the faces they touch."""
    labels = cc3d.connected_components(mask, connectivity=26)
    boxes = cc3d.statistics(labels)["bounding_boxes"]
    for i in range(1, int(labels.max()) + 1):
        box = boxes[i]
        obj = labels[box] == i
        if obj.sum() < MIN_OBJECT or (truth[box] & obj).any():
            continue
        faces = [
            f"{a}{'0' if s.start == 0 else '1'}"
            for a, s, n in zip("zyx", box, mask.shape, strict=True)
            if s.start == 0 or s.stop == n
        ]
        where = ",".join(f"{s.start}..{s.stop}" for s in box)
        print(f"object of {int(obj.sum())} voxels at {where} touches no label; faces: {faces or 'none'}")


def main() -> None:
    prediction = zarr.open(sys.argv[1], mode="r")[:]
    prediction = prediction[0] if prediction.ndim == 4 else prediction
    truth = zarr.open(sys.argv[2], mode="r")[:] > 0
    threshold = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
    mask = binarise(prediction, threshold)  # as `mitoseg evaluate` thresholds it
    print(f"Jaccard {count(mask, truth).jaccard:.4f} over {mask.shape} at threshold {threshold}")
    bands(mask, truth)
    unlabelled_objects(mask, truth)


if __name__ == "__main__":
    main()
