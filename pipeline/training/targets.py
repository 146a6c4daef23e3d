"""Training targets derived from the label: the boundary band that the contour head learns."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contour_target(label: torch.Tensor, width: int) -> torch.Tensor:
    """In-plane boundary band of a (B, Z, Y, X) mask: voxels whose (2w+1)^2 neighbourhood is mixed."""
    x = label.float()[:, None]
    k = (1, 2 * width + 1, 2 * width + 1)
    pad = (0, width, width)
    dilated = F.max_pool3d(x, k, stride=1, padding=pad)
    eroded = -F.max_pool3d(-x, k, stride=1, padding=pad)
    return (dilated - eroded)[:, 0]
