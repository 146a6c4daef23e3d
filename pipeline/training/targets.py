"""Training targets derived from the label: unannotated voxels, and the boundary band the contour head learns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255
"""Label value of unannotated voxels in training regions and batches (mitochondrion 1, background 0)."""


def split_ignore(label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The 0/1 mask of a (B, Z, Y, X) training label and where it is annotated (None: everywhere)."""
    annotated = label != IGNORE
    if bool(annotated.all()):
        return label, None
    return (label == 1).to(label.dtype), annotated


def contour_target(label: torch.Tensor, width: int) -> torch.Tensor:
    """In-plane boundary band of a (B, Z, Y, X) mask: voxels whose (2w+1)^2 neighbourhood is mixed."""
    x = label.float()[:, None]
    k = (1, 2 * width + 1, 2 * width + 1)
    pad = (0, width, width)
    dilated = F.max_pool3d(x, k, stride=1, padding=pad)
    eroded = -F.max_pool3d(-x, k, stride=1, padding=pad)
    return (dilated - eroded)[:, 0]


def contour_annotated(annotated: torch.Tensor, width: int) -> torch.Tensor:
    """Where the contour target is known: annotated voxels whose (2w+1)^2 in-plane neighbourhood is annotated."""
    x = (~annotated).float()[:, None]
    near_unannotated = F.max_pool3d(x, (1, 2 * width + 1, 2 * width + 1), stride=1, padding=(0, width, width))
    return near_unannotated[:, 0] == 0
