"""Test-time augmentation: every variant is undone exactly, and the average is symmetric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.network.tta import predict_probabilities, variants


@pytest.mark.parametrize(("mode", "count"), [("none", 1), ("yx", 8), ("zyx", 16)])
def test_variants_are_distinct(mode, count) -> None:
    found = variants(mode)
    assert len(found) == len(set(found)) == count


@pytest.mark.parametrize("mode", ["yx", "zyx"])
def test_voxelwise_network_is_unchanged_by_augmentation(mode) -> None:
    """A per-voxel function commutes with flips and swaps: any misplaced undo would move voxels."""
    batch = torch.rand((1, 1, 4, 6, 6), generator=torch.Generator().manual_seed(0))
    forward = lambda t: 5 * t - 2  # noqa: E731
    expected = torch.sigmoid(forward(batch))
    assert torch.allclose(predict_probabilities(forward, batch, mode), expected, atol=1e-6)
    assert torch.allclose(predict_probabilities(forward, batch, "none"), expected)


def test_average_of_a_position_biased_network_is_symmetric() -> None:
    """A network that favours one corner gives, after yx averaging, a map symmetric under flips and the swap."""
    ramp = torch.arange(6.0)
    forward = lambda t: t + ramp[None, None, None, :, None] + 2 * ramp[None, None, None, None, :]  # noqa: E731
    prob = predict_probabilities(forward, torch.zeros((1, 1, 2, 6, 6)), "yx")[0, 0].numpy()
    plain = predict_probabilities(forward, torch.zeros((1, 1, 2, 6, 6)), "none")[0, 0].numpy()
    assert not np.allclose(plain, plain[:, ::-1])
    for view in (prob[:, ::-1], prob[:, :, ::-1], prob.transpose(0, 2, 1)):
        np.testing.assert_allclose(prob, view, atol=1e-6)
