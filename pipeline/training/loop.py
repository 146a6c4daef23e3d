"""The training loop: DDP-aware, seeded, checkpointing, validation with threshold tuning, metrics."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.config.network import NetworkConfig
from pipeline.config.train import TrainConfig
from pipeline.errors import ConfigError
from pipeline.network.checkpoint import read_payload, save_checkpoint
from pipeline.network.model import ResUNet, build_network
from pipeline.synthetic import ensure_synthetic_training_data
from pipeline.training import distributed
from pipeline.training.data import LabelledRegion, PatchSampler, load_regions
from pipeline.training.losses import balanced_bce_dice, consistency_loss, contrastive_weight, similarity_loss
from pipeline.training.prefetch import BatchPrefetcher
from pipeline.training.sampling import sample_points
from pipeline.training.validate import ThresholdTuner, predict_volume

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run ended with."""

    step: int
    best_jaccard: float | None
    best_checkpoint: Path | None
    last_checkpoint: Path
    network: ResUNet
    average: nn.Module | None = None
    """The moving average of the weights (`optim.ema_decay`), which validation and checkpoints use."""


class TrainStep(nn.Module):
    """Network + point sampling + projection of the sampled points, as one module for DDP."""

    def __init__(self, network: ResUNet, cfg: TrainConfig) -> None:
        super().__init__()
        self.network = network
        self.cfg = cfg

    def forward(
        self, raw: torch.Tensor, label: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        logits, features = self.network.forward_features(raw)
        loss_cfg = self.cfg.loss
        if (loss_cfg.lambda_sim == 0 and loss_cfg.lambda_con == 0) or self.network.projection is None:
            return logits, None
        points = sample_points(torch.sigmoid(logits[:, 0].detach().float()), label, loss_cfg.sampling, generator)
        if len(points) > loss_cfg.max_points:
            keep = torch.randperm(len(points), generator=generator, device=label.device)[: loss_cfg.max_points]
            points = type(points)(*(t[keep] for t in (points.n, points.z, points.y, points.x, points.label)))
        depth = label.shape[1]
        nz = torch.where(points.z + 1 < depth, points.z + 1, points.z - 1).clamp(min=0)
        anchor_feat = features[points.n, :, points.z, points.y, points.x]
        neighbour_feat = features[points.n, :, nz, points.y, points.x]
        embedded = self.network.project(torch.cat([anchor_feat, neighbour_feat]).float())
        m = len(points)
        return logits, {
            "anchor": embedded[:m],
            "neighbour": embedded[m:],
            "label": points.label,
            "neighbour_label": (label[points.n, nz, points.y, points.x] > 0).long(),
        }


def contour_target(label: torch.Tensor, width: int) -> torch.Tensor:
    """In-plane boundary band of a (B, Z, Y, X) mask: voxels whose (2w+1)^2 neighbourhood is mixed."""
    x = label.float()[:, None]
    k = (1, 2 * width + 1, 2 * width + 1)
    pad = (0, width, width)
    dilated = F.max_pool3d(x, k, stride=1, padding=pad)
    eroded = -F.max_pool3d(-x, k, stride=1, padding=pad)
    return (dilated - eroded)[:, 0]


def compute_loss(
    logits: torch.Tensor, extra: dict[str, torch.Tensor] | None, label: torch.Tensor, cfg: TrainConfig, step: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its terms: seg (BCE + Dice per head), sim and con (ramped by the warm-up)."""
    lc = cfg.loss
    logits = logits.float()
    seg = balanced_bce_dice(logits[:, 0], label, class_balance=lc.class_balance, dice_weight=lc.dice_weight)
    if logits.shape[1] > 1:
        seg = seg + lc.contour_weight * balanced_bce_dice(
            logits[:, 1],
            contour_target(label, lc.contour_width),
            class_balance=lc.class_balance,
            dice_weight=lc.dice_weight,
        )
    total = seg
    terms = {"seg": float(seg.detach())}
    if extra is not None:
        ramp = contrastive_weight(step, lc)
        sim = similarity_loss(extra["anchor"], extra["label"], lc.temperature)
        con = consistency_loss(
            extra["anchor"], extra["label"], extra["neighbour"], extra["neighbour_label"], lc.temperature
        )
        total = total + ramp * (lc.lambda_sim * sim + lc.lambda_con * con)
        terms.update(sim=float(sim.detach()), con=float(con.detach()))
    terms["loss"] = float(total.detach())
    return total, terms


def schedule_progress(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """Fraction of the schedule done: by iterations, or by the wall-clock budget if that is further."""
    oc = cfg.optim
    progress = (step - oc.warmup_iterations) / max(1, oc.iterations - oc.warmup_iterations)
    if oc.time_budget_minutes is not None:
        progress = max(progress, elapsed_s / (60 * oc.time_budget_minutes))
    return min(1.0, max(0.0, progress))


def lr_factor(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up then cosine decay to min_lr, as a factor of the peak lr."""
    oc = cfg.optim
    if step < oc.warmup_iterations:
        return (step + 1) / oc.warmup_iterations
    progress = schedule_progress(step, elapsed_s, cfg)
    floor = oc.min_lr / oc.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    oc = cfg.optim
    if oc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=oc.lr, momentum=0.9, weight_decay=oc.weight_decay)
    cls = torch.optim.AdamW if oc.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=oc.lr, weight_decay=oc.weight_decay)


def make_average(network: ResUNet, cfg: TrainConfig) -> AveragedModel | None:
    """The moving average of `network` that validation and checkpoints use, or None when `ema_decay` is off."""
    if cfg.optim.ema_decay is None:
        return None
    return AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema_decay), use_buffers=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def validate(
    network: ResUNet, regions: list[LabelledRegion], cfg: TrainConfig, device: torch.device
) -> tuple[float, dict[str, float]]:
    """Tuned threshold and scores (jaccard, dice, miou) over all validation regions."""
    was_training = network.training
    network.eval()
    tuner = ThresholdTuner()
    for region in regions:
        prob = predict_volume(network, region.raw, cfg.val_patch_shape, network.context, cfg.val_overlap, device)
        tuner.update(prob[0], region.label)
    network.train(was_training)
    threshold, counts = tuner.best()
    return threshold, {**counts.scores(), "jaccard@0.5": tuner.counts(0.5).jaccard}


class MetricsLog:
    """CSV files (train.csv, val.csv) and TensorBoard events under the run folder (rank 0 only)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tb"))
        except ImportError:  # tensorboard is optional for the loop; CSV always works
            logger.warning("tensorboard not installed: metrics go to CSV only")

    def write(self, name: str, step: int, values: dict[str, float]) -> None:
        path = self.folder / f"{name}.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", *values])
            writer.writerow([step, *(f"{v:.6g}" for v in values.values())])
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{name}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _progress(total: int, start: int, enabled: bool) -> tuple:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
        transient=False,
    )
    task = progress.add_task("train", total=total, completed=start, info="")
    return progress, task


def train(cfg: TrainConfig, *, resume: bool = False, max_iterations: int | None = None) -> TrainResult:
    """Train (or resume) the network of `cfg`; returns the last step, best score and checkpoint paths.

    `max_iterations` stops at that absolute step without changing the schedule (for chunked runs).
    """
    info = distributed.setup(cfg.device)
    try:
        return _train(cfg, info, resume=resume, max_iterations=max_iterations)
    finally:
        distributed.teardown(info)


def _train(cfg: TrainConfig, info: distributed.DistInfo, *, resume: bool, max_iterations: int | None) -> TrainResult:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    last_path, best_path = out / "last.pt", out / "best.pt"
    # every check that can fail happens before the first step
    if info.is_main:
        ensure_synthetic_training_data(cfg.data)
    distributed.barrier(info)
    train_regions = load_regions(cfg.data, "train")
    val_regions = load_regions(cfg.data, "validation") if info.is_main else []
    sampler = PatchSampler(train_regions, cfg.data, cfg.augment)
    payload = None
    if resume:
        if not last_path.exists():
            raise ConfigError(f"--resume given but {last_path} does not exist: start without --resume")
        payload = read_payload(last_path)
        saved = json.loads(payload["metadata"])["train_config"]
        if saved.get("network") != cfg.network.model_dump(mode="json"):
            raise ConfigError(f"{last_path} was trained with another network config; resume needs the same one")

    init = read_payload(cfg.init_from) if cfg.init_from and payload is None else None
    if init is not None and NetworkConfig.model_validate_json(init["network_config"]) != cfg.network:
        raise ConfigError(f"init_from {cfg.init_from} holds another network than this config's network section")

    seed_everything(cfg.seed + info.rank)
    network = build_network(cfg.network).to(info.device)
    step, best, best_threshold = 0, None, 0.5
    if init is not None:
        missing, unexpected = network.load_state_dict(init["state_dict"], strict=False)
        if unexpected or any(not k.startswith("projection.") for k in missing):
            raise ConfigError(
                f"init_from {cfg.init_from} does not fit the network: missing {missing}, extra {unexpected}"
            )
        logger.info("starting from the weights of %s (step %s)", cfg.init_from, init.get("step"))
    average = make_average(network, cfg)
    if payload is not None:
        # with an average, "state_dict" holds the average (what inference loads) and "train_state_dict" the weights
        network.load_state_dict(payload.get("train_state_dict", payload["state_dict"]))
        step = int(payload["step"])
        best = payload.get("best_jaccard")
        best_threshold = float(payload.get("threshold", 0.5))
        if average is not None:
            if "train_state_dict" not in payload:
                raise ConfigError(f"{last_path} was trained without ema_decay; resume needs the same optim section")
            average.module.load_state_dict(payload["state_dict"])
            average.n_averaged.fill_(max(step, 1))
    evaluated = network if average is None else average.module
    module = TrainStep(network, cfg)
    if info.distributed:
        no_contrastive = cfg.loss.lambda_sim == 0 and cfg.loss.lambda_con == 0
        module = nn.parallel.DistributedDataParallel(
            module,
            device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            find_unused_parameters=no_contrastive,
        )
    optimizer = make_optimizer(list(network.parameters()), cfg)
    elapsed_before = 0.0
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        elapsed_before = float(payload["scheduler"]["elapsed_s"])
    started = time.perf_counter()

    def elapsed() -> float:
        """Training wall time over all runs of this schedule, agreed by all ranks."""
        return float(distributed.broadcast_object(elapsed_before + time.perf_counter() - started, info))

    stop = min(cfg.optim.iterations, max_iterations or cfg.optim.iterations)
    use_amp = cfg.mixed_precision and info.device.type == "cuda"
    metrics = MetricsLog(out) if info.is_main else None
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        (out / "config.json").write_text(cfg.model_dump_json(indent=2))
        logger.info("training %s from step %d to %d on %s x%d", cfg.name, step, stop, info.device, info.world_size)

    def checkpoint(path: Path, threshold: float, scores: dict[str, float] | None) -> None:
        metadata = {
            "train_config": cfg.model_dump(mode="json"),
            "step": step,
            "scores": scores,
            "split": cfg.data.split_name,
            "world_size": info.world_size,
            "weight_average": None if average is None else {"ema_decay": cfg.optim.ema_decay},
        }
        extra = {} if average is None else {"train_state_dict": network.state_dict()}
        save_checkpoint(
            path,
            network_config=cfg.network,
            state_dict=evaluated.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler={"step": step, "elapsed_s": now_elapsed},
            step=step,
            threshold=threshold,
            patch_shape=list(cfg.val_patch_shape),
            best_jaccard=best,
            metadata=metadata,
            **extra,
        )

    progress, task = _progress(stop, step, info.is_main and sys.stderr.isatty())
    network.train()
    tick, seen, last_scores = time.perf_counter(), 0, None
    now_elapsed = elapsed_before

    def done() -> bool:
        return step >= stop or (step > cfg.optim.warmup_iterations and schedule_progress(step, now_elapsed, cfg) >= 1)

    finished = done()
    prefetcher = BatchPrefetcher(sampler, cfg.seed, info.rank, cfg.data.batch_size, cfg.data.loader_workers)
    with progress, prefetcher:
        while not finished:
            now_elapsed = elapsed()
            for group in optimizer.param_groups:
                group["lr"] = cfg.optim.lr * lr_factor(step, cfg, now_elapsed)
            generator_seed, raw_np, label_np = prefetcher.batch(step)
            gen = torch.Generator(device=info.device).manual_seed(generator_seed)
            raw = torch.from_numpy(raw_np).to(info.device)
            label = torch.from_numpy(label_np).to(info.device)
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits, extra = module(raw, label, gen)
            loss, terms = compute_loss(logits, extra, label, cfg, step)
            if not math.isfinite(terms["loss"]):
                raise FloatingPointError(f"loss became {terms['loss']} at step {step}: lower optim.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(network.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            if average is not None:
                average.update_parameters(network)
            step += 1
            seen += cfg.data.batch_size * info.world_size
            now_elapsed = elapsed()
            finished = done()
            if info.is_main and (step % cfg.log_every == 0 or finished):
                now = time.perf_counter()
                terms.update(lr=optimizer.param_groups[0]["lr"], patches_per_s=seen / max(now - tick, 1e-9))
                tick, seen = now, 0
                metrics.write("train", step, terms)  # type: ignore[union-attr]
                text = " ".join(f"{k} {v:.4g}" for k, v in terms.items())
                progress.update(task, completed=step, info=text)
                if progress.disable:
                    logger.info("step %d/%d %s", step, stop, text)
            snapshot = cfg.snapshot_every is not None and step % cfg.snapshot_every == 0
            if step % cfg.checkpoint_every == 0 or step % cfg.val_every == 0 or finished or snapshot:
                distributed.average_buffers(network, info)
                if average is not None:  # its batch-norm statistics follow each rank's own batches
                    distributed.average_buffers(evaluated, info)
            if val_regions and (step % cfg.val_every == 0 or finished):
                threshold, scores = validate(evaluated, val_regions, cfg, info.device)
                last_scores = {**scores, "threshold": threshold}
                metrics.write("val", step, last_scores)  # type: ignore[union-attr]
                logger.info("validation at step %d: %s", step, json.dumps(last_scores))
                if best is None or scores["jaccard"] > best:
                    best, best_threshold = scores["jaccard"], threshold
                    checkpoint(best_path, threshold, last_scores)
            if info.is_main and (step % cfg.checkpoint_every == 0 or finished):
                checkpoint(last_path, best_threshold, last_scores)
            if info.is_main and snapshot:
                checkpoint(out / f"step_{step:07d}.pt", best_threshold, last_scores)
            if step % cfg.checkpoint_every == 0:
                distributed.barrier(info)
    if metrics is not None:
        metrics.close()
    best_checkpoint = best_path if best_path.exists() else None
    return TrainResult(step, best, best_checkpoint, last_path, network, None if average is None else evaluated)
