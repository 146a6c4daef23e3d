"""One training step's forward pass and its loss: segmentation heads plus the contrastive terms."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config.train import TrainConfig
from pipeline.network.model import ResUNet
from pipeline.training.losses import balanced_bce_dice, consistency_loss, contrastive_weight, similarity_loss
from pipeline.training.sampling import sample_points
from pipeline.training.targets import contour_annotated, contour_target, split_ignore


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
        truth, annotated = split_ignore(label)
        prob = torch.sigmoid(logits[:, 0].detach().float())
        points = sample_points(prob, truth, loss_cfg.sampling, generator, annotated)
        if len(points) > loss_cfg.max_points:
            keep = torch.randperm(len(points), generator=generator, device=label.device)[: loss_cfg.max_points]
            points = type(points)(*(t[keep] for t in (points.n, points.z, points.y, points.x, points.label)))
        depth = label.shape[1]
        nz = torch.where(points.z + 1 < depth, points.z + 1, points.z - 1).clamp(min=0)
        neighbour_annotated = torch.ones_like(points.label, dtype=torch.bool)
        if annotated is not None:  # the annotated one of the two neighbours, if either is
            below = (points.z - 1).clamp(min=0)
            use_below = (points.z > 0) & ~annotated[points.n, nz, points.y, points.x]
            nz = torch.where(use_below & annotated[points.n, below, points.y, points.x], below, nz)
            neighbour_annotated = annotated[points.n, nz, points.y, points.x]
        anchor_feat = features[points.n, :, points.z, points.y, points.x]
        neighbour_feat = features[points.n, :, nz, points.y, points.x]
        embedded = self.network.project(torch.cat([anchor_feat, neighbour_feat]).float())
        m = len(points)
        return logits, {
            "anchor": embedded[:m],
            "neighbour": embedded[m:],
            "label": points.label,
            "neighbour_label": (truth[points.n, nz, points.y, points.x] > 0).long(),
            "neighbour_annotated": neighbour_annotated,
        }


def compute_loss(
    logits: torch.Tensor, extra: dict[str, torch.Tensor] | None, label: torch.Tensor, cfg: TrainConfig, step: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its terms: seg (BCE + Dice per head), sim and con (ramped by the warm-up); unannotated voxels
    (IGNORE) take part in none of them."""
    lc = cfg.loss
    logits = logits.float()
    truth, annotated = split_ignore(label)
    seg = balanced_bce_dice(
        logits[:, 0], truth, class_balance=lc.class_balance, dice_weight=lc.dice_weight, mask=annotated
    )
    if logits.shape[1] > 1:
        seg = seg + lc.contour_weight * balanced_bce_dice(
            logits[:, 1],
            contour_target(truth, lc.contour_width),
            class_balance=lc.class_balance,
            dice_weight=lc.dice_weight,
            mask=None if annotated is None else contour_annotated(annotated, lc.contour_width),
        )
    total = seg
    terms = {"seg": float(seg.detach())}
    if extra is not None:
        ramp = contrastive_weight(step, lc)
        sim = similarity_loss(extra["anchor"], extra["label"], lc.temperature)
        pair = extra["neighbour_annotated"]  # consistency needs both points of a pair annotated
        con = consistency_loss(
            extra["anchor"][pair],
            extra["label"][pair],
            extra["neighbour"][pair],
            extra["neighbour_label"][pair],
            lc.temperature,
        )
        total = total + ramp * (lc.lambda_sim * sim + lc.lambda_con * con)
        terms.update(sim=float(sim.detach()), con=float(con.detach()))
    terms["loss"] = float(total.detach())
    return total, terms
