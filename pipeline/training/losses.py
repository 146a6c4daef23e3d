"""Training losses: class-balanced BCE + Dice per head, and the two contrastive terms of Li et al. (EMBC 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config.train import LossConfig


def balanced_bce_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    class_balance: float = 1.0,
    dice_weight: float = 0.5,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-balanced weighted BCE plus `dice_weight` x soft Dice, for one head (same-shape tensors), over the
    voxels where the boolean `mask` is True (None: all; none: 0 with grad).

    Weights are inverse class frequencies of the batch raised to `class_balance`, normalised so the
    mean weight is 1 (0 = plain BCE).
    """
    if mask is not None:
        if not mask.any():
            return logits.sum() * 0.0
        logits, target = logits[mask], target[mask]
    target = target.float()
    fg = target.mean().clamp(1e-3, 1 - 1e-3)
    w_fg, w_bg = (0.5 / fg) ** class_balance, (0.5 / (1 - fg)) ** class_balance
    weight = torch.where(target > 0.5, w_fg, w_bg)
    weight = weight / weight.mean()
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    if dice_weight == 0:
        return bce
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice_weight * dice


def similarity_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive (SupCon) loss over L2-normalised embeddings (M, D) with labels (M,).

    Anchors without any positive are ignored; returns 0 (with grad) when no anchor has one.
    """
    m = embeddings.shape[0]
    if m < 2:
        return embeddings.sum() * 0.0
    logits = embeddings @ embeddings.t() / temperature
    self_mask = torch.eye(m, dtype=torch.bool, device=embeddings.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positive.sum(1)
    valid = n_pos > 0
    if not valid.any():
        return embeddings.sum() * 0.0
    mean_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(1) / n_pos.clamp(min=1)
    return -mean_log_prob[valid].mean()


def consistency_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    neighbours: torch.Tensor,
    neighbour_labels: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Frame-to-frame InfoNCE: anchor i (z) against the neighbours of all anchors (same y, x at z +- 1).

    When label(i) == label(neighbour i) the own neighbour is the positive and the other-class neighbours
    are negatives (pulled together); otherwise the own neighbour is a negative and the same-class
    neighbours of other anchors are the positives (pushed apart). Inputs are L2-normalised (M, D).
    """
    m = anchors.shape[0]
    sim = anchors @ neighbours.t() / temperature
    own = torch.eye(m, dtype=torch.bool, device=anchors.device)
    same_class = anchor_labels[:, None] == neighbour_labels[None, :]
    agree = anchor_labels == neighbour_labels
    # candidates: own neighbour + other-class neighbours (agree) / own neighbour + same-class ones (disagree)
    positive = torch.where(agree[:, None], own, same_class & ~own)
    candidate = torch.where(agree[:, None], own | ~same_class, positive | own)
    valid = positive.any(1)
    if not valid.any():
        return anchors.sum() * 0.0
    neg_inf = torch.tensor(float("-inf"), device=sim.device, dtype=sim.dtype)
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()
    log_num = torch.logsumexp(torch.where(positive, sim, neg_inf), dim=1)
    log_den = torch.logsumexp(torch.where(candidate, sim, neg_inf), dim=1)
    return (log_den - log_num)[valid].mean()


def contrastive_weight(step: int, cfg: LossConfig) -> float:
    """Ramp factor in [0, 1] of the contrastive terms (linear warm-up)."""
    if cfg.contrastive_warmup == 0:
        return 1.0
    return min(1.0, step / cfg.contrastive_warmup)
