"""Test-time augmentation: average a network's probabilities over flipped and transposed copies of a patch.

Each variant is an exact symmetry of the voxel grid (flips of z, y, x; swapping y and x), so a patch is
predicted from the same voxels whatever the variant: the seam-free guarantee of `pipeline.stitching` holds
with any mode. The y/x swap assumes square pixels in-plane, as in EM.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # configs import TTAMode: keep torch out of their import
    import torch

TTAMode = Literal["none", "yx", "zyx"]
"""none: one pass; yx: the 8 in-plane variants (flips of y and x, y/x swap); zyx: those 16 with a z flip too."""


def variants(mode: TTAMode) -> list[tuple[tuple[int, ...], bool]]:
    """(flipped tensor dims of an (N, C, Z, Y, X) batch, y/x swapped) for every variant of `mode`."""
    if mode == "none":
        return [((), False)]
    axes = (3, 4) if mode == "yx" else (2, 3, 4)
    picks = itertools.product((False, True), repeat=len(axes))
    flips = [tuple(a for a, on in zip(axes, pick, strict=True) if on) for pick in picks]
    return [(dims, swap) for swap in (False, True) for dims in flips]


def predict_probabilities(
    forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, mode: TTAMode = "none"
) -> torch.Tensor:
    """Mean sigmoid of `forward` (logits of an (N, C, Z, Y, X) batch) over the variants of `mode`, in float32."""
    import torch

    total, views = None, variants(mode)
    for dims, swap in views:
        x = torch.flip(batch, dims) if dims else batch
        logits = forward(x.transpose(3, 4) if swap else x)
        logits = logits.transpose(3, 4) if swap else logits
        prob = torch.sigmoid((torch.flip(logits, dims) if dims else logits).float())
        total = prob if total is None else total.add_(prob)
    return total.div_(len(views))  # type: ignore[union-attr]
