"""Semantic evaluation: hand-computed answers, chunk-by-chunk equals whole-volume, CLI JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from daisy import Roi
from typer.testing import CliRunner

from pipeline.cli.evaluate import evaluate
from pipeline.errors import GeometryError
from pipeline.evaluation import SemanticCounts, count, evaluate_semantic
from pipeline.volumes import VolumeMeta, create_volume, open_volume


def _write(url: str, data: np.ndarray, chunks: tuple[int, int, int] = (2, 3, 3)) -> str:
    channels = data if data.ndim == 4 else data[None]
    meta = VolumeMeta(shape=channels.shape[1:], dtype=channels.dtype, chunks=chunks, num_channels=channels.shape[0])
    create_volume(url, meta).write(meta.roi, channels)
    return url


def test_counts_and_scores_on_a_hand_made_case() -> None:
    pred = np.array([1, 1, 0, 0, 1, 0], bool)
    true = np.array([1, 0, 1, 0, 1, 0], bool)
    c = count(pred, true)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 2)
    assert c.jaccard == pytest.approx(0.5) and c.dice == pytest.approx(2 / 3)
    assert c.miou == pytest.approx((0.5 + 0.5) / 2)
    assert SemanticCounts().jaccard == 1.0  # both empty: perfect, not a division by zero


def test_probability_volume_chunk_by_chunk_matches_whole_volume(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = (rng.random((5, 7, 8)) > 0.7).astype(np.uint8) * 3  # any value > 0 is mitochondrion
    prob = rng.integers(0, 256, size=(5, 7, 8), dtype=np.uint8)
    p_url = _write(f"zarr://file://{tmp_path}/pred.zarr", np.stack([prob, 255 - prob]))
    t_url = _write(str(tmp_path / "truth.zarr"), truth)
    scores = evaluate_semantic(p_url, t_url, threshold=0.6)
    oracle = count(prob >= 0.6 * 255, truth > 0)
    assert scores == pytest.approx({**oracle.scores(), "threshold": 0.6})


def test_threshold_comes_from_provenance_else_half(tmp_path: Path) -> None:
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[:, :2] = 1
    prob = np.where(truth > 0, 200, 100).astype(np.uint8)  # 0.78 inside, 0.39 outside
    p_url = _write(str(tmp_path / "pred.zarr"), prob)
    t_url = _write(str(tmp_path / "truth.zarr"), truth)
    assert evaluate_semantic(p_url, t_url)["jaccard"] == 1.0  # default 0.5
    open_volume(p_url, mode="r+").set_provenance({"threshold": 0.3, "checkpoint_hash": "x"})
    scores = evaluate_semantic(p_url, t_url)
    assert scores["threshold"] == 0.3 and scores["jaccard"] == 0.5  # everything is foreground at 0.3


def test_label_and_float_predictions(tmp_path: Path) -> None:
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0] = 1
    t_url = _write(str(tmp_path / "truth.zarr"), truth)
    labels = np.zeros((2, 4, 4), np.uint32)
    labels[0, :2] = 7
    assert evaluate_semantic(_write(str(tmp_path / "l.zarr"), labels), t_url)["jaccard"] == 0.5
    mask = (labels > 0).astype(np.uint8)  # a 0/1 uint8 mask without provenance is a label volume
    assert evaluate_semantic(_write(str(tmp_path / "m.zarr"), mask), t_url)["jaccard"] == 0.5
    floats = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    assert evaluate_semantic(_write(str(tmp_path / "f.zarr"), floats), t_url)["dice"] == 1.0


def test_shape_mismatch_is_a_geometry_error(tmp_path: Path) -> None:
    a = _write(str(tmp_path / "a.zarr"), np.zeros((2, 4, 4), np.uint8))
    b = _write(str(tmp_path / "b.zarr"), np.zeros((2, 4, 5), np.uint8))
    with pytest.raises(GeometryError, match="same shape"):
        evaluate_semantic(a, b)


def test_cli_prints_one_json_object(tmp_path: Path) -> None:
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[:, 1:3] = 1
    t_url = _write(str(tmp_path / "truth.zarr"), truth)
    p_url = _write(str(tmp_path / "pred.zarr"), truth * 255)
    app = typer.Typer()
    app.command()(evaluate)
    result = CliRunner().invoke(app, ["--prediction", p_url, "--truth", t_url, "--threshold", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"jaccard": 1.0, "dice": 1.0, "miou": 1.0, "threshold": 0.5}


def test_only_the_region_counts_given_or_recorded_by_segment(tmp_path: Path) -> None:
    truth = np.zeros((6, 8, 8), np.uint8)
    truth[:, 2:6, 2:6] = 1
    prob = np.zeros((6, 8, 8), np.uint8)  # predicted only in z 2..4, as `segment --roi` leaves it
    prob[2:4] = truth[2:4] * 255
    t_url = _write(str(tmp_path / "truth.zarr"), truth)
    p_url = _write(str(tmp_path / "pred.zarr"), prob)
    assert evaluate_semantic(p_url, t_url)["jaccard"] == pytest.approx(1 / 3)
    assert evaluate_semantic(p_url, t_url, roi=Roi((2, 0, 0), (2, 8, 8)))["jaccard"] == 1.0
    open_volume(p_url, mode="r+").set_provenance({"threshold": 0.5, "checkpoint_hash": "x", "roi": "2,0,0:2,8,8"})
    assert evaluate_semantic(p_url, t_url)["jaccard"] == 1.0
    assert evaluate_semantic(p_url, t_url, roi=Roi((0, 0, 0), (6, 8, 8)))["jaccard"] == pytest.approx(1 / 3)
    with pytest.raises(GeometryError, match="(?s)region 4,0,0:4,8,8 reaches outside.*--roi"):
        evaluate_semantic(p_url, t_url, roi=Roi((4, 0, 0), (4, 8, 8)))
    app = typer.Typer()
    app.command()(evaluate)
    result = CliRunner().invoke(app, ["--prediction", p_url, "--truth", t_url, "--roi", "0,0,0:3,8,8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["jaccard"] == pytest.approx(1 / 3)  # z 2 right, z 0..1 missed


def test_unlabelled_voxels_of_sparse_truth_are_not_scored(tmp_path: Path) -> None:
    truth = np.full((2, 3, 3), 255, np.uint8)  # 255 = not annotated
    truth[0] = [[1, 0, 0], [0, 0, 0], [0, 0, 1]]  # one annotated slice
    pred = np.zeros((2, 3, 3), np.uint8)
    pred[0, 0, 0] = pred[0, 1, 1] = 1  # one hit, one false positive; the unlabelled slice predicts nothing
    truth_url = _write(f"zarr://file://{tmp_path}/t.zarr", truth)
    pred_url = _write(f"zarr://file://{tmp_path}/p.zarr", pred)
    sparse = evaluate_semantic(pred_url, truth_url, kind="label", ignore_label=255)
    assert sparse["jaccard"] == pytest.approx(1 / 3)  # tp 1, fp 1, fn 1 on the annotated slice only
    assert evaluate_semantic(pred_url, truth_url, kind="label")["jaccard"] < 0.2  # 255 counted as mitochondrion
