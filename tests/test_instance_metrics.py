"""Instance metrics on hand-made cases whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from daisy import Roi

from pipeline.errors import ConfigError, GeometryError
from pipeline.evaluation import evaluate_all
from pipeline.instance_metrics import instance_scores, instance_scores_arrays
from pipeline.volumes import VolumeMeta, create_volume


def row(*segments: tuple[int, int, int], length: int = 20) -> np.ndarray:
    """A (1, 1, length) label array with (start, stop, id) runs."""
    out = np.zeros((1, 1, length), np.uint32)
    for start, stop, label in segments:
        out[0, 0, start:stop] = label
    return out


def test_perfect_prediction_up_to_renumbering():
    truth = row((0, 4, 1), (6, 9, 2), (12, 20, 3))
    pred = row((0, 4, 30), (6, 9, 10), (12, 20, 20))
    scores = instance_scores_arrays(pred, truth)
    assert scores["ap50"] == scores["ap75"] == 1.0
    assert scores["object_precision"] == scores["object_recall"] == scores["object_f1"] == 1.0
    assert scores["num_predicted"] == scores["num_truth"] == scores["num_matched"] == 3


def test_a_larger_false_positive_ranked_first_halves_ap():
    truth = row((0, 4, 1))
    pred = row((0, 4, 2), (10, 15, 1))  # the 5-voxel false positive outranks the true 4-voxel match
    scores = instance_scores_arrays(pred, truth)
    # precision 0 then 1/2 at recall 1: interpolated precision is 1/2 at every recall point
    assert scores["ap50"] == pytest.approx(0.5) and scores["ap75"] == pytest.approx(0.5)
    assert scores["object_precision"] == 0.5 and scores["object_recall"] == 1.0


def test_a_smaller_false_positive_ranked_last_costs_nothing():
    truth = row((0, 4, 1))
    pred = row((0, 4, 1), (10, 12, 2))
    assert instance_scores_arrays(pred, truth)["ap50"] == 1.0


def test_iou_between_thresholds_counts_at_50_but_not_at_75():
    truth = row((0, 10, 1))
    pred = row((0, 6, 1))  # IoU 0.6
    scores = instance_scores_arrays(pred, truth)
    assert scores["ap50"] == 1.0 and scores["ap75"] == 0.0


def test_half_the_objects_found():
    truth = row((0, 4, 1), (10, 14, 2))
    pred = row((0, 4, 1))
    scores = instance_scores_arrays(pred, truth)
    # precision 1 up to recall 0.5 (51 of the 101 recall points), 0 beyond
    assert scores["ap50"] == pytest.approx(51 / 101)
    assert scores["object_precision"] == 1.0 and scores["object_recall"] == 0.5
    assert scores["object_f1"] == pytest.approx(2 / 3)


def test_a_merged_prediction_matches_at_most_one_object():
    truth = row((0, 5, 1), (5, 10, 2))
    pred = row((0, 10, 1))  # IoU exactly 0.5 with each: matches one of them (ties go to the lower id)
    scores = instance_scores_arrays(pred, truth)
    assert scores["num_matched"] == 1 and scores["object_recall"] == 0.5
    three = row((0, 4, 1), (4, 8, 2), (8, 12, 3))
    assert instance_scores_arrays(row((0, 12, 1)), three)["num_matched"] == 0  # IoU 1/3 each


def test_empty_prediction_and_empty_truth():
    truth = row((0, 4, 1))
    empty = row()
    scores = instance_scores_arrays(empty, truth)
    assert scores["ap50"] == 0.0 and scores["object_recall"] == 0.0 and math.isnan(scores["object_precision"])
    assert math.isnan(instance_scores_arrays(truth, empty)["ap50"])


def _write(url: str, data: np.ndarray, chunks=(2, 4, 4)) -> str:
    meta = VolumeMeta(shape=data.shape, dtype=data.dtype, chunks=chunks, layer_type="segmentation")
    create_volume(url, meta).write(meta.roi, data[None])
    return url


def test_volume_scores_read_in_slabs_equal_in_memory_scores(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, size=(6, 8, 8)).astype(np.uint64)
    pred = np.where(rng.random(truth.shape) < 0.8, truth, rng.integers(0, 6, size=truth.shape)).astype(np.uint32)
    t = _write(str(tmp_path / "truth.zarr"), truth)
    p = _write(f"precomputed://file://{tmp_path}/pred", pred)
    got = instance_scores(p, t, slab_voxels=100)  # a few z-slices at a time
    assert got == pytest.approx(instance_scores_arrays(pred, truth), nan_ok=True)


def test_a_binary_truth_mask_is_split_into_its_connected_components(tmp_path):
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[0:2, 0:3, 0:3] = 1
    truth[2:4, 5:8, 5:8] = 1
    pred = np.zeros((4, 8, 8), np.uint64)
    pred[0:2, 0:3, 0:3] = 5  # one object found exactly, the other missed
    t = _write(str(tmp_path / "truth.zarr"), truth)
    p = _write(str(tmp_path / "pred.zarr"), pred)
    scores = instance_scores(p, t, slab_voxels=64)
    assert scores["num_truth"] == 2 and scores["object_recall"] == 0.5 and scores["object_precision"] == 1.0
    assert instance_scores(p, t, truth_components=False)["num_truth"] == 1


def test_instance_scores_over_a_region_count_only_what_lies_inside(tmp_path):
    truth = np.zeros((6, 8, 8), np.uint8)
    truth[0:2, 0:3, 0:3] = 1
    truth[3:6, 4:8, 4:8] = 1
    pred = np.zeros((6, 8, 8), np.uint64)
    pred[3:6, 4:8, 4:8] = 9  # the second object found, the first missed
    t = _write(str(tmp_path / "truth.zarr"), truth)
    p = _write(str(tmp_path / "pred.zarr"), pred)
    assert instance_scores(p, t)["object_recall"] == 0.5
    inside = instance_scores(p, t, slab_voxels=16, roi=Roi((3, 2, 2), (3, 6, 6)))
    assert inside["num_truth"] == 1 and inside["object_recall"] == 1.0 and inside["ap75"] == 1.0


def test_volume_scores_refuse_mismatched_shapes_and_non_labels(tmp_path):
    t = _write(str(tmp_path / "truth.zarr"), np.zeros((4, 8, 8), np.uint64))
    p = _write(str(tmp_path / "pred.zarr"), np.zeros((4, 8, 4), np.uint64))
    with pytest.raises(GeometryError, match="same voxels"):
        instance_scores(p, t)
    f = _write(str(tmp_path / "probs.zarr"), np.zeros((4, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="integer labels"):
        instance_scores(f, t)


def test_evaluate_adds_instance_scores_for_label_volumes_only(tmp_path):
    labels = np.zeros((4, 8, 8), np.uint64)
    labels[1:3, 2:6, 2:6] = 7
    truth = _write(str(tmp_path / "truth.zarr"), (labels > 0).astype(np.uint8))
    pred = _write(str(tmp_path / "pred.zarr"), labels)
    probs = str(tmp_path / "probs.zarr")
    meta = VolumeMeta(shape=(4, 8, 8), dtype=np.dtype(np.uint8), chunks=(2, 4, 4))
    create_volume(probs, meta).write(meta.roi, (labels > 0).astype(np.uint8)[None] * 255)
    label_scores = evaluate_all(pred, truth)
    assert label_scores["ap75"] == 1.0 and label_scores["jaccard"] == 1.0
    prob_scores = evaluate_all(probs, truth)
    assert "ap75" not in prob_scores and prob_scores["jaccard"] == 1.0
