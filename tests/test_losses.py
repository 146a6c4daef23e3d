"""Loss values on hand-made cases, numerical stability, and gradient flow."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config.network import NetworkConfig
from pipeline.config.train import LossConfig
from pipeline.training.losses import balanced_bce_dice, consistency_loss, contrastive_weight, similarity_loss


def _clusters(separated: bool, n: int = 64, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    centres = torch.eye(dim)[:2] if separated else torch.eye(dim)[:1].repeat(2, 1)
    emb = centres[labels] + 0.05 * torch.randn(n, dim, generator=gen)
    return F.normalize(emb, dim=1), labels


def test_similarity_is_lower_for_separated_classes() -> None:
    sep = similarity_loss(*_clusters(True))
    mixed = similarity_loss(*_clusters(False))
    assert sep < mixed


def test_similarity_of_single_class_without_positives_is_zero() -> None:
    emb = F.normalize(torch.randn(2, 4), dim=1)
    assert similarity_loss(emb, torch.tensor([0, 1])).item() == 0.0


def test_consistency_rises_when_adjacent_labels_differ_but_embeddings_agree() -> None:
    anchors, labels = _clusters(True, n=32)
    same = consistency_loss(anchors, labels, anchors.clone(), labels.clone())
    flipped = labels.clone()
    flipped[:8] = 1 - flipped[:8]  # content changes between frames for 8 points, embeddings do not
    changed = consistency_loss(anchors, labels, anchors.clone(), flipped)
    assert changed > same + 0.5


def test_consistency_is_low_when_embeddings_follow_the_labels() -> None:
    anchors, labels = _clusters(True, n=32)
    neighbours = F.normalize(torch.eye(8)[:2][labels] + 0.01, dim=1)
    assert consistency_loss(anchors, labels, neighbours, labels, temperature=0.1) < 0.05


def test_no_nan_or_inf_with_thousands_of_points_and_small_temperature() -> None:
    gen = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(4000, 16, generator=gen), dim=1).requires_grad_(True)
    labels = torch.randint(2, (4000,), generator=gen)
    nb = F.normalize(emb.detach() + 0.1 * torch.randn(4000, 16, generator=gen), dim=1).requires_grad_(True)
    total = similarity_loss(emb, labels, 0.01) + consistency_loss(emb, labels, nb, labels.roll(1), 0.01)
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(nb.grad).all()


def test_balanced_bce_dice_prefers_the_right_answer() -> None:
    target = torch.zeros(1, 4, 8, 8)
    target[:, :, :2] = 1
    good = balanced_bce_dice(torch.where(target > 0, 8.0, -8.0), target)
    bad = balanced_bce_dice(torch.where(target > 0, -8.0, 8.0), target)
    assert good < 0.01 < bad


def test_contrastive_warmup_ramps_linearly() -> None:
    cfg = LossConfig(contrastive_warmup=10)
    assert [contrastive_weight(s, cfg) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]


def test_gradients_reach_backbone_and_projection_head() -> None:
    from pipeline.config.train import TrainConfig
    from pipeline.network.model import build_network
    from pipeline.training.step import TrainStep, compute_loss

    torch.manual_seed(0)
    net_cfg = NetworkConfig(widths=[4, 8], embedding_dim=8)
    cfg = TrainConfig(
        network=net_cfg,
        data={"volumes": [{"raw": "r", "label": "l"}], "patch_shape": (4, 16, 16)},
        loss={"contrastive_warmup": 0, "lambda_sim": 1.0, "lambda_con": 1.0, "sampling": {"num_points": 64}},
        val_patch_shape=(8, 40, 40),
    )
    net = build_network(net_cfg)
    label = torch.zeros(1, 4, 16, 16, dtype=torch.uint8)
    label[:, :, 4:10, 4:10] = 1
    logits, extra = TrainStep(net, cfg)(torch.rand(1, 1, 4, 16, 16), label, torch.Generator().manual_seed(0))
    loss, terms = compute_loss(logits, extra, label, cfg, step=5)
    loss.backward()
    assert {"seg", "sim", "con", "loss"} <= set(terms)
    for name in ("stem.0.weight", "encoders.1.1.conv2.weight", "projection.body.0.weight", "projection.body.3.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
