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

BANDS = (0, 8, 16, 32, 64, 10**9)
MIN_OBJECT = 500


def jaccard(mask: np.ndarray, truth: np.ndarray) -> float:
    return float((mask & truth).sum() / max((mask | truth).sum(), 1))


def bands(mask: np.ndarray, truth: np.ndarray) -> None:
    """Per axis, the score of the slabs at each distance band from that axis's two faces."""
    for axis, name in enumerate("zyx"):
        n = mask.shape[axis]
        distance = np.minimum(np.arange(n), n - 1 - np.arange(n))
        cells = []
        for low, high in zip(BANDS[:-1], BANDS[1:], strict=True):
            rows = (distance >= low) & (distance < high)
            m, t = np.compress(rows, mask, axis=axis), np.compress(rows, truth, axis=axis)
            inter = (m & t).sum()
            cells.append(
                f"[{low},{min(high, n)}): J {jaccard(m, t):.3f} p {inter / max(m.sum(), 1):.2f} "
                f"r {inter / max(t.sum(), 1):.2f}"
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
    mask = prediction >= threshold * (255.0 if prediction.dtype == np.uint8 else 1.0)  # as `mitoseg evaluate`
    print(f"Jaccard {jaccard(mask, truth):.4f} over {mask.shape} at threshold {threshold}")
    bands(mask, truth)
    unlabelled_objects(mask, truth)


if __name__ == "__main__":
    main()
