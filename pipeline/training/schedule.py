"""The optimisation schedule: learning-rate warm-up and cosine decay, the optimizer, the weight average."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.config.train import TrainConfig
from pipeline.network.model import ResUNet


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
    """The optimizer `optim.optimizer` names, at the peak lr (the schedule scales it each step)."""
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
