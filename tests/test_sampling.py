"""Hard-example point sampling: the most uncertain points, labels from the ground truth."""

from __future__ import annotations

import torch

from pipeline.config.train import SamplingConfig
from pipeline.training.sampling import sample_points


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    prob = torch.rand(2, 3, 16, 16, generator=gen) * 0.1  # confident background everywhere ...
    prob[:, :, 5, :] = 0.5  # ... except one maximally uncertain row per slice
    truth = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    truth[:, :, 5, :8] = 1
    return prob, truth


def test_beta_one_picks_the_most_uncertain_points_with_their_labels() -> None:
    prob, truth = _case()
    cfg = SamplingConfig(num_points=3 * 8, oversample=32, importance=1.0)  # 8 per slice, 256 candidates
    points = sample_points(prob, truth, cfg, torch.Generator().manual_seed(1))
    assert len(points) == 2 * 3 * 8
    assert torch.all(points.y == 5)
    assert torch.equal(points.label, (points.x < 8).long())
    assert torch.equal(points.label, truth[points.n, points.z, points.y, points.x].long())
    counts = torch.bincount(points.n * 3 + points.z, minlength=6)
    assert torch.all(counts == 8)  # spread evenly over patches and slices


def test_random_mode_is_uniform_and_labelled() -> None:
    prob, truth = _case()
    points = sample_points(
        prob, truth, SamplingConfig(mode="random", num_points=3 * 200), torch.Generator().manual_seed(2)
    )
    assert (points.y == 5).float().mean() < 0.2
    assert torch.equal(points.label, truth[points.n, points.z, points.y, points.x].long())


def test_misclassified_mode_takes_half_wrong_points() -> None:
    prob, truth = _case()
    prob[:, :, 10, :4] = 0.9  # false positives
    points = sample_points(
        prob, truth, SamplingConfig(mode="misclassified", num_points=3 * 8), torch.Generator().manual_seed(3)
    )
    p = prob[points.n, points.z, points.y, points.x]
    wrong = (p >= 0.5) != points.label.bool()
    assert wrong.float().mean() == 0.5


def test_same_generator_seed_same_points() -> None:
    prob, truth = _case()
    cfg = SamplingConfig(num_points=30)
    a = sample_points(prob, truth, cfg, torch.Generator().manual_seed(7))
    b = sample_points(prob, truth, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
