"""The training loop: set-up and resume, one step, validation and checkpoints, on one rank or many (DDP).

What a step computes is in `step.py`, the lr schedule, optimizer and weight average in `schedule.py`, the metric
files in `metrics.py` and validation in `validate.py`; this module runs them in order and keeps the run's state.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from pipeline.config.network import NetworkConfig
from pipeline.config.train import TrainConfig
from pipeline.errors import ConfigError
from pipeline.network.checkpoint import read_payload, save_checkpoint
from pipeline.network.model import ResUNet, build_network
from pipeline.progress import Progress
from pipeline.synthetic import ensure_synthetic_training_data
from pipeline.training import distributed
from pipeline.training.data import LabelledRegion, PatchSampler, load_regions
from pipeline.training.finetune import training_voxel_size, with_init_network
from pipeline.training.metrics import MetricsLog
from pipeline.training.prefetch import BatchPrefetcher
from pipeline.training.schedule import lr_factor, make_average, make_optimizer, schedule_progress
from pipeline.training.step import TrainStep, compute_loss
from pipeline.training.validate import validate

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
    voxel_size_nm: tuple[float, float, float] | None = None
    """The training data's voxel size (z, y, x) in nm, recorded in the checkpoints (None: unknown)."""


def train(cfg: TrainConfig, *, resume: bool = False, max_iterations: int | None = None) -> TrainResult:
    """Train (or resume) the network of `cfg`; returns the last step, best score and checkpoint paths.

    `max_iterations` stops at that absolute step without changing the schedule (for chunked runs).
    """
    info = distributed.setup(cfg.device)
    try:
        return _train(cfg, info, resume=resume, max_iterations=max_iterations)
    finally:
        distributed.teardown(info)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (each rank passes its own seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train(cfg: TrainConfig, info: distributed.DistInfo, *, resume: bool, max_iterations: int | None) -> TrainResult:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # every check that can fail happens before the first step
    cfg = with_init_network(cfg)
    if info.is_main:
        ensure_synthetic_training_data(cfg.data)
    distributed.barrier(info)
    train_regions = load_regions(cfg.data, "train")
    val_regions = load_regions(cfg.data, "validation") if info.is_main else []
    sampler = PatchSampler(train_regions, cfg.data, cfg.augment)
    payload, init = _read_start(cfg, resume)
    voxel_size = training_voxel_size(train_regions + val_regions, init, cfg.init_from)
    run = _Run(cfg, info, payload, init, val_regions, max_iterations, voxel_size)
    progress = Progress("train", run.stop, completed=run.step, unit="steps", enabled=info.is_main)
    finished = run.begin()
    prefetcher = BatchPrefetcher(sampler, cfg.seed, info.rank, cfg.data.batch_size, cfg.data.loader_workers)
    with progress, prefetcher:
        while not finished:
            terms = run.train_step(prefetcher)
            finished = run.done()
            if info.is_main and (run.step % cfg.log_every == 0 or finished):
                run.log(terms, progress)
            run.validate_and_checkpoint(finished)
    return run.finish()


def _read_start(cfg: TrainConfig, resume: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The checkpoint to resume from (`last.pt`) and the one to start from (`init_from`), each checked to fit."""
    last_path = Path(cfg.output_dir) / "last.pt"
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
    return payload, init


def _start_network(cfg: TrainConfig, info: distributed.DistInfo, init: dict[str, Any] | None) -> ResUNet:
    """A freshly seeded network on this rank's device, with `init_from`'s weights when given."""
    seed_everything(cfg.seed + info.rank)
    network = build_network(cfg.network).to(info.device)
    if init is not None:
        missing, unexpected = network.load_state_dict(init["state_dict"], strict=False)
        if unexpected or any(not k.startswith("projection.") for k in missing):
            raise ConfigError(
                f"init_from {cfg.init_from} does not fit the network: missing {missing}, extra {unexpected}"
            )
        logger.info("starting from the weights of %s (step %s)", cfg.init_from, init.get("step"))
    return network


def _parallel(module: TrainStep, cfg: TrainConfig, info: distributed.DistInfo) -> nn.Module:
    """`module` itself on one rank, wrapped in DistributedDataParallel on several."""
    if not info.distributed:
        return module
    no_contrastive = cfg.loss.lambda_sim == 0 and cfg.loss.lambda_con == 0
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=[info.local_rank] if info.device.type == "cuda" else None,
        find_unused_parameters=no_contrastive,  # without contrastive terms the projection head gets no gradient
    )


class _Run:
    """One run's state across steps: network, weight average, optimizer, step, best score and the schedule's clock."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: distributed.DistInfo,
        payload: dict[str, Any] | None,
        init: dict[str, Any] | None,
        val_regions: list[LabelledRegion],
        max_iterations: int | None,
        voxel_size_nm: tuple[float, float, float] | None,
    ) -> None:
        self.cfg, self.info, self.val_regions, self.voxel_size_nm = cfg, info, val_regions, voxel_size_nm
        self.out = Path(cfg.output_dir)
        self.last_path, self.best_path = self.out / "last.pt", self.out / "best.pt"
        self.network = _start_network(cfg, info, init)
        self.step, self.best_threshold = 0, 0.5
        self.best: float | None = None
        self.average = make_average(self.network, cfg)
        if payload is not None:
            self._restore_weights(payload)
        self.evaluated = self.network if self.average is None else cast(ResUNet, self.average.module)
        self.module = _parallel(TrainStep(self.network, cfg), cfg, info)
        self.optimizer = make_optimizer(list(self.network.parameters()), cfg)
        self.elapsed_before = 0.0
        if payload is not None:
            self.optimizer.load_state_dict(payload["optimizer"])
            self.elapsed_before = float(payload["scheduler"]["elapsed_s"])
        self.started = time.perf_counter()
        self.now_elapsed = self.elapsed_before
        self.stop = min(cfg.optim.iterations, max_iterations or cfg.optim.iterations)
        self.use_amp = cfg.mixed_precision and info.device.type == "cuda"
        self.metrics = MetricsLog(self.out) if info.is_main else None
        self.out.mkdir(parents=True, exist_ok=True)
        if info.is_main:
            (self.out / "config.json").write_text(cfg.model_dump_json(indent=2))
            logger.info(
                "training %s from step %d to %d on %s x%d", cfg.name, self.step, self.stop, info.device, info.world_size
            )
        self.last_scores: dict[str, float] | None = None
        self.tick, self.seen = time.perf_counter(), 0

    def _restore_weights(self, payload: dict[str, Any]) -> None:
        """Weights, weight average, step and best score of the run being resumed."""
        # with an average, "state_dict" holds the average (what inference loads) and "train_state_dict" the weights
        self.network.load_state_dict(payload.get("train_state_dict", payload["state_dict"]))
        self.step = int(payload["step"])
        self.best = payload.get("best_jaccard")
        self.best_threshold = float(payload.get("threshold", 0.5))
        if self.average is not None:
            if "train_state_dict" not in payload:
                raise ConfigError(
                    f"{self.last_path} was trained without ema_decay; resume needs the same optim section"
                )
            self.average.module.load_state_dict(payload["state_dict"])
            self.average.n_averaged.fill_(max(self.step, 1))

    def begin(self) -> bool:
        """Put the network in training mode and start the throughput clock; True if the schedule is already done."""
        self.network.train()
        self.tick, self.seen = time.perf_counter(), 0
        return self.done()

    def elapsed(self) -> float:
        """Training wall time over all runs of this schedule, agreed by all ranks."""
        elapsed = self.elapsed_before + time.perf_counter() - self.started
        return cast(float, distributed.broadcast_object(elapsed, self.info))

    def done(self) -> bool:
        """Whether the schedule (iterations, `max_iterations` or the time budget) has ended."""
        cfg = self.cfg
        return self.step >= self.stop or (
            self.step > cfg.optim.warmup_iterations and schedule_progress(self.step, self.now_elapsed, cfg) >= 1
        )

    def train_step(self, prefetcher: BatchPrefetcher) -> dict[str, float]:
        """One optimisation step on this step's batch; returns the loss terms."""
        cfg, info = self.cfg, self.info
        self.now_elapsed = self.elapsed()
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(self.step, cfg, self.now_elapsed)
        generator_seed, raw_np, label_np = prefetcher.batch(self.step)
        gen = torch.Generator(device=info.device).manual_seed(generator_seed)
        raw = torch.from_numpy(raw_np).to(info.device)
        label = torch.from_numpy(label_np).to(info.device)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            logits, extra = self.module(raw, label, gen)
        loss, terms = compute_loss(logits, extra, label, cfg, self.step)
        if not math.isfinite(terms["loss"]):
            raise FloatingPointError(f"loss became {terms['loss']} at step {self.step}: lower optim.lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.network.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        if self.average is not None:
            self.average.update_parameters(self.network)
        self.step += 1
        self.seen += cfg.data.batch_size * info.world_size
        self.now_elapsed = self.elapsed()
        return terms

    def log(self, terms: dict[str, float], progress: Progress) -> None:
        """A train.csv row (loss terms, lr, throughput since the last row) and the progress line (rank 0)."""
        now = time.perf_counter()
        terms.update(lr=self.optimizer.param_groups[0]["lr"], patches_per_s=self.seen / max(now - self.tick, 1e-9))
        self.tick, self.seen = now, 0
        if self.metrics is not None:
            self.metrics.write("train", self.step, terms)
        progress.update(completed=self.step, info=" ".join(f"{k} {v:.4g}" for k, v in terms.items()))

    def validate_and_checkpoint(self, finished: bool) -> None:
        """Agree batch-norm statistics over ranks, validate and write checkpoints at the steps the config names."""
        cfg, info, step = self.cfg, self.info, self.step
        snapshot = cfg.snapshot_every is not None and step % cfg.snapshot_every == 0
        if step % cfg.checkpoint_every == 0 or step % cfg.val_every == 0 or finished or snapshot:
            distributed.average_buffers(self.network, info)
            if self.average is not None:  # its batch-norm statistics follow each rank's own batches
                distributed.average_buffers(self.evaluated, info)
        if self.val_regions and (step % cfg.val_every == 0 or finished):
            threshold, scores = validate(self.evaluated, self.val_regions, cfg, info.device)
            self.last_scores = {**scores, "threshold": threshold}
            if self.metrics is not None:
                self.metrics.write("val", step, self.last_scores)
            logger.info("validation at step %d: %s", step, json.dumps(self.last_scores))
            if self.best is None or scores["jaccard"] > self.best:
                self.best, self.best_threshold = scores["jaccard"], threshold
                self.save(self.best_path, threshold, self.last_scores)
        if info.is_main and (step % cfg.checkpoint_every == 0 or finished):
            self.save(self.last_path, self.best_threshold, self.last_scores)
        if info.is_main and snapshot:
            self.save(self.out / f"step_{step:07d}.pt", self.best_threshold, self.last_scores)
        if step % cfg.checkpoint_every == 0:
            distributed.barrier(info)

    def save(self, path: Path, threshold: float, scores: dict[str, float] | None) -> None:
        """A checkpoint: the weights inference loads, plus all that resuming needs."""
        cfg = self.cfg
        metadata = {
            "train_config": cfg.model_dump(mode="json"),
            "step": self.step,
            "scores": scores,
            "split": cfg.data.split_name,
            "world_size": self.info.world_size,
            "weight_average": None if self.average is None else {"ema_decay": cfg.optim.ema_decay},
        }
        extra = {} if self.average is None else {"train_state_dict": self.network.state_dict()}
        save_checkpoint(
            path,
            network_config=cfg.network,
            state_dict=self.evaluated.state_dict(),
            voxel_size_nm=self.voxel_size_nm,
            optimizer=self.optimizer.state_dict(),
            scheduler={"step": self.step, "elapsed_s": self.now_elapsed},
            step=self.step,
            threshold=threshold,
            patch_shape=list(cfg.val_patch_shape),
            best_jaccard=self.best,
            metadata=metadata,
            **extra,
        )

    def finish(self) -> TrainResult:
        """Close the metric files; the run's result."""
        if self.metrics is not None:
            self.metrics.close()
        best_checkpoint = self.best_path if self.best_path.exists() else None
        average = None if self.average is None else self.evaluated
        return TrainResult(
            self.step, self.best, best_checkpoint, self.last_path, self.network, average, self.voxel_size_nm
        )
