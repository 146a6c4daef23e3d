"""Cross-validation: fold ranges and gaps, no training region meets its held-out slab, finished folds are not
trained again, the threshold is the pooled out-of-fold optimum, and the report says what was chosen and how."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import LUCCHI

from pipeline.config import load_config
from pipeline.config.train import TrainConfig
from pipeline.errors import ConfigError, GeometryError
from pipeline.evaluation import count
from pipeline.training import crossval
from pipeline.training.crossval import FoldSplit, choose_settings, plan_folds, split_folds, train_fold
from pipeline.training.validate import ThresholdTuner

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("extent", "folds", "gap", "min_depth", "expected"),
    [
        # Lucchi's 165 slices in 5 folds, gap 4, patch depth 8: the end folds train on one slab, the others on two
        (
            (0, 165),
            5,
            4,
            8,
            [
                ((0, 33), ((37, 165),)),
                ((33, 66), ((0, 29), (70, 165))),
                ((66, 99), ((0, 62), (103, 165))),
                ((99, 132), ((0, 95), (136, 165))),
                ((132, 165), ((0, 128),)),
            ],
        ),
        # sizes differ by at most one when K does not divide the extent; no gap: the rest touches the slab
        ((10, 17), 3, 0, 1, [((10, 12), ((12, 17),)), ((12, 14), ((10, 12), (14, 17))), ((14, 17), ((10, 14),))]),
        # a part thinner than the patch depth is left out: fold 1's z 0..2 and fold 2's z 17..19 (3 slices < 4)
        (
            (0, 20),
            4,
            2,
            4,
            [((0, 5), ((7, 20),)), ((5, 10), ((12, 20),)), ((10, 15), ((0, 8),)), ((15, 20), ((0, 13),))],
        ),
    ],
)
def test_folds_tile_the_extent_and_train_outside_slab_and_gap(
    extent: tuple[int, int], folds: int, gap: int, min_depth: int, expected: list
) -> None:
    splits = split_folds(*extent, folds, gap, min_depth)
    assert splits == [FoldSplit(v, t) for v, t in expected]
    assert [s.validation for s in splits] == sorted(s.validation for s in splits)
    assert splits[0].validation[0] == extent[0] and splits[-1].validation[1] == extent[1]
    assert all(a.validation[1] == b.validation[0] for a, b in zip(splits, splits[1:], strict=False))
    for split in splits:
        low, high = split.validation[0] - gap, split.validation[1] + gap
        assert all(stop <= low or start >= high for start, stop in split.train)
        assert all(stop - start >= min_depth for start, stop in split.train)


@pytest.mark.parametrize(
    ("extent", "folds", "gap", "error", "pattern"),
    [
        ((0, 20), 1, 0, ConfigError, "at least 2 folds"),
        ((0, 20), 2, -1, ConfigError, "slices >= 0"),
        ((0, 3), 4, 0, GeometryError, "fewer slices than --folds 4"),
        ((0, 16), 4, 5, ConfigError, r"fold 1 .*no part of 4 slices .*fewer folds or a smaller --gap"),
    ],
)
def test_impossible_splits_say_what_to_change(
    extent: tuple[int, int], folds: int, gap: int, error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        split_folds(*extent, folds, gap, 4)


def _job(tmp_path: Path) -> dict:
    """A tiny network on a small synthetic training volume (generated on first use), plus a validation-only volume
    that cross-validation must not use."""
    return {
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "num_threads": 1,
        "device": "cpu",
        "data": {
            "volumes": [
                {
                    "raw": str(tmp_path / "syn.zarr" / "raw"),
                    "label": str(tmp_path / "syn.zarr" / "label"),
                    "synthetic": {"shape": [24, 48, 48], "seed": 0},
                    "train": {"z": [0, 18]},
                    "validation": {"z": [18, 24]},
                },
                {
                    "raw": str(tmp_path / "other.zarr" / "raw"),
                    "label": str(tmp_path / "other.zarr" / "label"),
                    "synthetic": {"shape": [8, 48, 48], "seed": 1},
                    "train": None,
                    "validation": {},
                },
            ],
            "patch_shape": [4, 32, 32],
        },
        "network": {"widths": [4, 8], "embedding_dim": 8, "context": [1, 4, 4]},
        "loss": {"contrastive_warmup": 1, "sampling": {"num_points": 32}},
        "optim": {"lr": 0.01, "warmup_iterations": 1, "iterations": 3},
        "augment": {"elastic": 0.0},
        "checkpoint_every": 100,
        "val_patch_shape": [8, 32, 32],
    }


def test_fold_jobs_train_the_recipe_outside_the_held_out_slab(tmp_path: Path) -> None:
    cfg = TrainConfig.model_validate(_job(tmp_path))
    plans = plan_folds(cfg, 3, crossval.default_gap(cfg), tmp_path / "cv")
    assert crossval.default_gap(cfg) == 2
    assert [[h.slab for h in p.held_out] for p in plans] == [[(0, 8)], [(8, 16)], [(16, 24)]]
    assert [[h.read for h in p.held_out] for p in plans] == [[(0, 10)], [(6, 18)], [(14, 24)]]
    trained = [[v.train.z for v in p.config.data.volumes if v.train is not None] for p in plans]
    assert trained == [[(10, 24)], [(0, 6), (18, 24)], [(0, 14)]]
    for plan in plans:
        (held,) = plan.held_out
        assert held.source.raw.endswith("syn.zarr/raw")  # the validation-only volume is not cross-validated
        for volume in plan.config.data.volumes:
            assert volume.validation is None and volume.raw == held.source.raw and volume.train is not None
            start, stop = volume.train.z or (0, 0)
            assert stop <= held.read[0] or start >= held.read[1]  # nor does it train on the context read
        assert plan.config.output_dir == str(tmp_path / "cv" / f"fold_{plan.index}")
        assert plan.config.network == cfg.network and plan.config.optim == cfg.optim


@pytest.mark.skipif(not LUCCHI.exists(), reason="the Lucchi data set is not in ../shared/data/lucchi")
def test_lucchi_recipe_splits_the_whole_training_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    cfg = load_config(TrainConfig, "configs/lucchi.yaml")
    plans = plan_folds(cfg, 5, crossval.default_gap(cfg), Path("unused"))
    assert [p.held_out[0].slab for p in plans] == [(0, 33), (33, 66), (66, 99), (99, 132), (132, 165)]
    assert [v.train.z for v in plans[2].config.data.volumes if v.train] == [(0, 62), (103, 165)]


def _tuner(fg: dict[float, int], bg: dict[float, int]) -> ThresholdTuner:
    """Histograms of `count` voxels at each probability, foreground and background."""
    tuner = ThresholdTuner()
    for values, truth in ((fg, 1), (bg, 0)):
        for prob, n in values.items():
            tuner.update(np.full(n, prob + 0.0025), np.full(n, truth))  # + half a bin: no voxel sits on a threshold
    return tuner


def test_the_threshold_is_the_optimum_of_the_pooled_predictions() -> None:
    # fold a alone: t <= 0.1 gives 100 / 190 = 0.53, 0.1 < t <= 0.3 60 / 190, above 0.3 60 / 100 = 0.6 -> t 0.9;
    # fold b alone: t <= 0.3 gives 90 / 140 = 0.64, best -> t 0.3; pooled: t <= 0.1 gives 190 / 330 = 0.576,
    # 0.1 < t <= 0.3 150 / 330, 0.3 < t <= 0.5 80 / 240, above 80 / 190: only the pooled counts choose t 0.1
    folds = [({0.1: 40, 0.9: 60}, {0.3: 90}), ({0.3: 70, 0.7: 20}, {0.5: 50})]
    tuners = [{0: _tuner(fg, bg)} for fg, bg in folds]
    median, threshold, table = choose_settings(tuners)
    assert (median, threshold) == (0, 0.1)
    assert [t[0].best()[0] for t in tuners] == [0.9, 0.3]
    assert table == [
        {"median": 0, "threshold": 0.1, "jaccard": pytest.approx(190 / 330), "dice": pytest.approx(380 / 520)}
    ]

    # the same against a brute force over every threshold of the pooled voxels
    voxels = [
        (p + 0.0025, truth, n) for fold in folds for truth, part in enumerate(fold[::-1]) for p, n in part.items()
    ]
    prob = np.concatenate([np.full(n, p) for p, _, n in voxels])
    truth = np.concatenate([np.full(n, t) for _, t, n in voxels])
    brute = {c / 200: count(prob >= c / 200, truth > 0).jaccard for c in range(10, 199)}
    assert brute[threshold] == pytest.approx(max(brute.values()))

    # a median size is chosen only when it scores higher pooled; on a tie the smaller (cheaper) one
    better = [{0: t[0], 5: _tuner({0.9: 10}, {0.1: 10})} for t in tuners]
    assert choose_settings(better)[0] == 5
    tied = [{0: t[0], 3: t[0]} for t in tuners]
    assert choose_settings(tied)[:2] == (0, 0.1)


@dataclass
class _Run:
    """One `mitoseg crossval` run of the tiny job: its job file, output folder and printed text."""

    job: Path
    out: Path
    stdout: str


@pytest.fixture(scope="module")
def crossval_run(tmp_path_factory: pytest.TempPathFactory) -> _Run:
    """`mitoseg crossval` as a user runs it: 3 folds of 2 steps each, median sizes 0 and 3 to choose from."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    tmp_path = tmp_path_factory.mktemp("crossval")
    job, out = tmp_path / "job.yaml", tmp_path / "cv"
    job.write_text(yaml.safe_dump(_job(tmp_path)))
    args = ["crossval", str(job), "--folds", "3", "--out", str(out), "--median", "0,3", "--max-iterations", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    return _Run(job, out, result.stdout)


def test_crossval_command_trains_each_fold_scores_it_and_reports(crossval_run: _Run) -> None:
    job, out = crossval_run.job, crossval_run.out
    report = json.loads((out / "crossval.json").read_text())
    assert report["command"] == (f"mitoseg crossval {job} --folds 3 --out {out} --median 0,3 --max-iterations 2")
    assert report["gap"] == 2
    assert [r["fold"] for r in report["folds"]] == [0, 1, 2]
    assert [r["validation"][0]["z"] for r in report["folds"]] == [[0, 8], [8, 16], [16, 24]]
    assert [[t["z"] for t in r["train"]] for r in report["folds"]] == [[[10, 24]], [[0, 6], [18, 24]], [[0, 14]]]
    assert all(r["step"] == 2 and r["voxels"] == 8 * 48 * 48 for r in report["folds"])
    assert all((out / f"fold_{j}" / "last.pt").exists() for j in range(3))
    chosen = report["chosen"]
    assert [c["median"] for c in report["candidates"]] == [0, 3]
    best = max(report["candidates"], key=lambda c: c["jaccard"])
    assert (chosen["median"], chosen["threshold"]) == (best["median"], best["threshold"])
    assert report["pooled"]["jaccard"] == pytest.approx(best["jaccard"])
    jaccards = [r["jaccard"] for r in report["folds"]]
    assert all(0 <= j <= 1 for j in jaccards)
    assert report["across_folds"]["jaccard"]["mean"] == pytest.approx(np.mean(jaccards))
    assert report["across_folds"]["jaccard"]["std"] == pytest.approx(np.std(jaccards, ddof=1))
    final = load_config(TrainConfig, out / "all_data.yaml")
    assert [(v.train, v.validation) for v in final.data.volumes] == [(final.data.volumes[0].train, None)]
    assert final.data.volumes[0].train is not None and final.data.volumes[0].train.z == (0, 24)
    assert report["apply"] == [
        f"mitoseg train {out / 'all_data.yaml'}",
        f"mitoseg checkpoint export {out / 'all'}/last.pt {out / 'all' / 'tiny.pt'} "
        f"--threshold {chosen['threshold']:g} --median {chosen['median']}",
    ]
    assert (
        "across folds (mean ± std): jaccard" in crossval_run.stdout
        and f"threshold {chosen['threshold']:.3f}" in crossval_run.stdout
    )
    assert "mitoseg checkpoint export" in crossval_run.stdout and "folds trained now 3, reused 0" in crossval_run.stdout


def test_finished_folds_are_not_trained_again_and_interrupted_ones_resume(
    crossval_run: _Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cv"
    shutil.copytree(crossval_run.out, out)
    first = json.loads((out / "crossval.json").read_text())
    cfg = load_config(TrainConfig, crossval_run.job)
    stamps = [(out / f"fold_{j}" / "last.pt").stat().st_mtime_ns for j in range(3)]
    calls: list[bool] = []

    def refuse(*args: object, resume: bool = False, **kwargs: object) -> None:
        calls.append(resume)
        raise RuntimeError("stop")

    monkeypatch.setattr("pipeline.training.loop.train", refuse)
    again = crossval.cross_validate(cfg, folds=3, out=out, medians=[0, 3], max_iterations=2)
    assert (again.trained, again.reused) == (0, 3) and calls == []
    assert [(r["jaccard"], r["step"]) for r in again.report["folds"]] == [
        (r["jaccard"], r["step"]) for r in first["folds"]
    ]
    assert again.report["chosen"] == first["chosen"]
    assert [(out / f"fold_{j}" / "last.pt").stat().st_mtime_ns for j in range(3)] == stamps

    plan = plan_folds(cfg, 3, 2, out)[1]
    with pytest.raises(RuntimeError, match="stop"):  # a longer run continues the fold from its last checkpoint
        train_fold(plan, max_iterations=3)
    record = out / "fold_1" / crossval.FOLD_RECORD
    assert calls == [True] and json.loads(record.read_text())["step"] is None
    with pytest.raises(ConfigError, match=r"fold_0 holds fold 0 of another cross-validation .*another --out"):
        train_fold(plan_folds(cfg, 3, 0, out)[0], max_iterations=2)
    with pytest.raises(ConfigError, match=r"--median \[0, 4\]: give odd sizes"):
        crossval.cross_validate(cfg, folds=3, out=out, medians=[0, 4])


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        (["--median", "a"], r"--median 'a': give comma-separated odd sizes"),
        (["--median", "0,4"], r"--median \[0, 4\]: give odd sizes"),
        (["--folds", "1"], "cross-validation needs at least 2 folds"),
        (["--folds", "30"], r"z extent \[0, 24\) has fewer slices than --folds 30"),
    ],
)
def test_bad_options_fail_before_any_training_with_what_to_do(tmp_path: Path, options: list[str], pattern: str) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(tmp_path)))
    result = CliRunner().invoke(app, ["crossval", str(job), "--out", str(tmp_path / "cv"), *options])
    assert isinstance(result.exception, ConfigError | GeometryError)
    assert re.search(pattern, str(result.exception))
    assert not (tmp_path / "cv").exists()
