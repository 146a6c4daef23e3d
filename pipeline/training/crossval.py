"""Cross-validation on the training volumes: K contiguous z-folds, one network per fold, and the decision threshold
(and median filter) chosen on the pooled out-of-fold predictions.

This is the honest protocol of issue #22: every setting is chosen on the training data, so the data that reports a
score (a held-out test volume) has chosen nothing. Each fold trains with the config's own recipe on the rest of each
volume less a gap of slices on each side of its held-out slab (neighbouring slices are near copies), and predicts its
slab as `segment` predicts a region: its patch grid, mirror padding and blending, with the untrained gap slices as
input context.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config.train import DataConfig, Region, TrainConfig, VolumeSource
from pipeline.errors import ConfigError, GeometryError
from pipeline.synthetic import ensure_synthetic_training_data
from pipeline.training.data import load_regions, open_pair
from pipeline.training.targets import IGNORE
from pipeline.training.validate import ThresholdTuner

logger = logging.getLogger(__name__)

REPORT_NAME = "crossval.json"
FOLD_RECORD = "crossval_fold.json"
ALL_DATA_CONFIG = "all_data.yaml"

ZRange = tuple[int, int]


@dataclass(frozen=True)
class FoldSplit:
    """One fold of one volume's z extent, as [start, stop) ranges in voxels: the held-out slab and the slabs trained
    on."""

    validation: ZRange
    train: tuple[ZRange, ...]


def split_folds(start: int, stop: int, folds: int, gap: int, min_depth: int) -> list[FoldSplit]:
    """`folds` contiguous slabs of z in [start, stop) (sizes differ by at most one). Fold j holds out slab j and
    trains on the rest less `gap` slices on each side of it; a part thinner than `min_depth` (one training patch)
    is left out."""
    if folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if gap < 0:
        raise ConfigError(f"--gap {gap}: give a number of slices >= 0")
    if stop - start < folds:
        raise GeometryError(f"z extent [{start}, {stop}) has fewer slices than --folds {folds}: use fewer folds")
    edges = [start + j * (stop - start) // folds for j in range(folds + 1)]
    out = []
    for j in range(folds):
        low, high = edges[j], edges[j + 1]
        parts = ((start, low - gap), (high + gap, stop))
        kept = tuple(p for p in parts if p[1] - p[0] >= min_depth)
        if not kept:
            raise ConfigError(
                f"fold {j} holds out z [{low}, {high}) of [{start}, {stop}) and, with a gap of {gap} slices, leaves "
                f"no part of {min_depth} slices (the patch depth) to train on: use fewer folds or a smaller --gap"
            )
        out.append(FoldSplit((low, high), kept))
    return out


@dataclass(frozen=True)
class HeldOut:
    """A fold's held-out slab of one volume (`slab`) and the z range read to predict it (`read`: the slab plus up
    to `gap` untrained slices of context on each side)."""

    source: VolumeSource
    slab: ZRange
    read: ZRange


@dataclass(frozen=True)
class FoldPlan:
    """One fold: its training job (the config's recipe on the fold's training slabs) and its held-out slabs."""

    index: int
    config: TrainConfig
    held_out: tuple[HeldOut, ...]


def _z_extent(source: VolumeSource, depth: int) -> ZRange:
    """The z span of a volume's train and validation regions together (None = the whole axis)."""
    ranges = [r.z or (0, depth) for r in (source.train, source.validation) if r is not None]
    return min(a for a, _ in ranges), max(b for _, b in ranges)


def _with_regions(source: VolumeSource, train: ZRange | None, validation: ZRange | None) -> VolumeSource:
    """`source` with the given train and validation z ranges (y and x: its train region's), validated again."""
    kept = source.train or Region()
    box = {"y": kept.y, "x": kept.x}
    return VolumeSource.model_validate(
        {
            **source.model_dump(exclude_unset=True),
            "train": None if train is None else Region(z=train, **box),
            "validation": None if validation is None else Region(z=validation, **box),
        }
    )


def _job(cfg: TrainConfig, name: str, output_dir: Path, volumes: list[VolumeSource], split: str) -> TrainConfig:
    """`cfg`'s recipe on other volumes, under another name and folder (fields `cfg` left unset stay unset)."""
    data = {**cfg.data.model_dump(exclude_unset=True), "volumes": volumes, "split_name": split}
    job = {**cfg.model_dump(exclude_unset=True), "name": name, "output_dir": str(output_dir), "data": data}
    return TrainConfig.model_validate(job)


def default_gap(cfg: TrainConfig) -> int:
    """Slices left out on each side of a held-out slab unless --gap says: half the training patch depth."""
    return cfg.data.patch_shape[0] // 2


def _grown(slab: ZRange, gap: int, depth: int) -> ZRange:
    """`slab` with `gap` slices more on each side, inside a volume of `depth` slices."""
    return max(0, slab[0] - gap), min(depth, slab[1] + gap)


def plan_folds(cfg: TrainConfig, folds: int, gap: int, out: Path) -> list[FoldPlan]:
    """The folds of every volume of `cfg` that has a train region (volumes only validated on are not used), one
    training job each under `out`/fold_J."""
    ensure_synthetic_training_data(cfg.data)
    depth = cfg.data.patch_shape[0]
    splits: list[tuple[VolumeSource, int, list[FoldSplit]]] = []
    for source in cfg.data.volumes:
        if source.train is None:
            continue
        size = int(open_pair(source.raw, source.label)[0].meta.shape[0])
        start, stop = _z_extent(source, size)
        splits.append((source, size, split_folds(start, stop, folds, gap, depth)))
    if not splits:
        raise ConfigError("the config has no volume with a `train` region: cross-validation splits those")
    plans = []
    for j in range(folds):
        volumes = [_with_regions(s, part, None) for s, _, fold in splits for part in fold[j].train]
        held = tuple(HeldOut(s, fold[j].validation, _grown(fold[j].validation, gap, size)) for s, size, fold in splits)
        slabs = ", ".join(f"z {h.slab[0]}..{h.slab[1] - 1}" for h in held)
        split = f"crossval fold {j + 1}/{folds}: validation {slabs}, gap {gap}"
        plans.append(FoldPlan(j, _job(cfg, f"{cfg.name}-fold{j}", out / f"fold_{j}", volumes, split), held))
    return plans


def all_data_config(cfg: TrainConfig, out: Path) -> TrainConfig:
    """`cfg`'s recipe trained on the whole z extent of every training volume, nothing held out: the network the
    chosen settings are for."""
    ensure_synthetic_training_data(cfg.data)
    volumes = [
        _with_regions(s, _z_extent(s, int(open_pair(s.raw, s.label)[0].meta.shape[0])), None)
        for s in cfg.data.volumes
        if s.train is not None
    ]
    return _job(cfg, cfg.name, out / "all", volumes, "all training data (settings chosen by cross-validation)")


def train_fold(plan: FoldPlan, max_iterations: int | None) -> tuple[Path, int, bool]:
    """Train fold `plan` unless it finished before with the same job: (its final checkpoint, its step, whether it
    trained now). A fold interrupted before its end resumes from its last checkpoint."""
    from pipeline.training.loop import train

    out = Path(plan.config.output_dir)
    record_path, last = out / FOLD_RECORD, out / "last.pt"
    job = plan.config.model_dump(mode="json", exclude={"output_dir"})  # the folder may have moved
    wanted = json.loads(json.dumps({"train_config": job, "max_iterations": max_iterations}))  # as it reads back
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is None and last.exists():
        raise ConfigError(f"{out} holds a training run that is not this cross-validation's: give another --out")
    if record is not None and record["train_config"] != wanted["train_config"]:
        raise ConfigError(
            f"{out} holds fold {plan.index} of another cross-validation (another config, --folds or --gap): "
            f"give another --out, or delete {out} to train it again"
        )
    finished = record is not None and record.get("step") is not None and record["max_iterations"] == max_iterations
    if record is not None and finished and last.exists():
        logger.info("fold %d finished before (step %d): not trained again", plan.index, record["step"])
        return last, int(record["step"]), False
    out.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps({**wanted, "step": None}))
    result = train(plan.config, resume=record is not None and last.exists(), max_iterations=max_iterations)
    record_path.write_text(json.dumps({**wanted, "step": result.step}))
    return result.last_checkpoint, result.step, True


def predict_fold(plan: FoldPlan, checkpoint: Path, medians: list[int], overlap: float) -> dict[int, ThresholdTuner]:
    """Histograms of fold `plan`'s out-of-fold probabilities against the truth on its annotated held-out voxels,
    one per median size, predicted as `segment` runs `checkpoint` (its patch shape, `overlap`)."""
    import torch

    from pipeline.network.checkpoint import load_checkpoint
    from pipeline.training.validate import predict_volume

    device = "cuda" if plan.config.device != "cpu" and torch.cuda.is_available() else "cpu"
    loaded = load_checkpoint(checkpoint, device)
    tuners = {m: ThresholdTuner() for m in medians}
    for held in plan.held_out:
        source = _with_regions(held.source, None, held.read)
        region = load_regions(DataConfig(volumes=[source]), "validation")[0]
        rows = slice(held.slab[0] - held.read[0], held.slab[1] - held.read[0])
        label = region.label[rows]
        annotated = label != IGNORE
        for size in medians:  # the median filters each tile, so each size is a prediction of its own
            prob = predict_volume(
                loaded.network,
                region.raw,
                loaded.patch_shape,
                loaded.network.context,
                overlap,
                device,
                margin=loaded.margin,
                median_size=size,
            )
            tuners[size].update(prob[0, rows], label, None if annotated.all() else annotated)
    return tuners


def pooled(tuners: list[ThresholdTuner]) -> ThresholdTuner:
    """One tuner holding the counts of all of `tuners` (the pooled out-of-fold predictions)."""
    total = ThresholdTuner()
    for tuner in tuners:
        total.fg += tuner.fg
        total.bg += tuner.bg
    return total


def choose_settings(fold_tuners: list[dict[int, ThresholdTuner]]) -> tuple[int, float, list[dict[str, float]]]:
    """The median size and threshold with the highest pooled Jaccard over all folds (ties: the smaller median),
    and each median size's best threshold and pooled scores."""
    candidates = []
    for size in sorted(fold_tuners[0]):
        threshold, counts = pooled([f[size] for f in fold_tuners]).best()
        candidates.append({"median": size, "threshold": threshold, "jaccard": counts.jaccard, "dice": counts.dice})
    best = max(candidates, key=lambda c: c["jaccard"])  # the first maximum: the smallest median
    return int(best["median"]), float(best["threshold"]), candidates


def _spread(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation of per-fold scores."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))}


@dataclass
class CrossvalResult:
    """What a cross-validation ended with: its report (also written as JSON) and how many folds trained now."""

    report: dict[str, Any]
    path: Path
    trained: int
    reused: int


def cross_validate(
    cfg: TrainConfig,
    *,
    folds: int,
    out: Path,
    gap: int | None = None,
    medians: list[int] | None = None,
    max_iterations: int | None = None,
    command: str = "",
) -> CrossvalResult:
    """Train `folds` networks on z-folds of `cfg`'s training volumes, choose the threshold and median size (from
    `medians`, default none) that maximise the pooled out-of-fold Jaccard, score each fold at them, and write the
    report to `out`/crossval.json with a config that trains the network on all the data."""
    import yaml

    medians = sorted(set(medians or [0]))
    if any(m < 0 or (m and m % 2 == 0) for m in medians):
        raise ConfigError(f"--median {medians}: give odd sizes (a centre voxel), or 0 for none")
    gap = default_gap(cfg) if gap is None else gap
    plans = plan_folds(cfg, folds, gap, out)
    trained, fold_tuners, facts = 0, [], []
    for plan in plans:
        checkpoint, step, fresh = train_fold(plan, max_iterations)
        trained += fresh
        fold_tuners.append(predict_fold(plan, checkpoint, medians, cfg.val_overlap))
        facts.append({"checkpoint": str(checkpoint), "step": step})
    median, threshold, candidates = choose_settings(fold_tuners)
    at_choice = [tuners[median].counts(threshold) for tuners in fold_tuners]
    rows = []
    for plan, tuners, fact, counts in zip(plans, fold_tuners, facts, at_choice, strict=True):
        rows.append(
            {
                "fold": plan.index,
                "validation": [{"raw": h.source.raw, "z": list(h.slab)} for h in plan.held_out],
                "train": [{"raw": v.raw, "z": v.train.z} for v in plan.config.data.volumes if v.train is not None],
                **fact,
                "voxels": counts.tp + counts.fp + counts.fn + counts.tn,
                "jaccard": counts.jaccard,
                "dice": counts.dice,
                "threshold_alone": tuners[median].best()[0],
            }
        )
    spread = {"jaccard": _spread([c.jaccard for c in at_choice]), "dice": _spread([c.dice for c in at_choice])}
    total = pooled([t[median] for t in fold_tuners]).counts(threshold)
    final = all_data_config(cfg, out)
    final_path = out / ALL_DATA_CONFIG
    final_path.write_text(yaml.safe_dump(final.model_dump(mode="json", exclude_unset=True), sort_keys=False))
    export = Path(final.output_dir) / f"{cfg.name}.pt"
    report = {
        "command": command,
        "gap": gap,
        "folds": rows,
        "chosen": {"threshold": threshold, "median": median},
        "candidates": candidates,
        "pooled": {"jaccard": total.jaccard, "dice": total.dice},
        "across_folds": spread,
        "apply": [
            f"mitoseg train {final_path}",
            f"mitoseg checkpoint export {final.output_dir}/last.pt {export} "
            f"--threshold {threshold:g} --median {median}",
        ],
    }
    path = out / REPORT_NAME
    path.write_text(json.dumps(report, indent=2))
    logger.info("cross-validation report written to %s", path)
    return CrossvalResult(report, path, trained, len(plans) - trained)
