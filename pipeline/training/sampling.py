"""Hard-example point sampling for the contrastive loss (PointRend-style; training only).

Points are drawn per patch and per z-slice on the detached foreground probability; each point takes its
class from the ground-truth mask at the same voxel (the embedding is at full resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config.train import SamplingConfig


@dataclass
class Points:
    """Sampled voxels: flat indices into (N, Z, Y, X) as separate index tensors, and their labels."""

    n: torch.Tensor
    z: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return int(self.label.numel())


def _uncertainty_pick(prob: torch.Tensor, count: int, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """Flat (y*X + x) indices in one slice: beta*count most uncertain of k*count candidates, rest random."""
    plane = prob.numel()
    hard = int(round(cfg.importance * count))
    chosen = []
    if hard > 0:
        candidates = torch.randint(plane, (cfg.oversample * count,), generator=gen, device=prob.device)
        uncertainty = (prob.flatten()[candidates] - 0.5).abs()
        chosen.append(candidates[torch.topk(-uncertainty, hard).indices])
    if count - hard > 0:
        chosen.append(torch.randint(plane, (count - hard,), generator=gen, device=prob.device))
    return torch.cat(chosen)


def _misclassified_pick(prob: torch.Tensor, truth: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """Half misclassified, half correctly classified voxels, each half split evenly over the classes
    present in it; a half with no voxels at all gives its share to the other half."""
    flat_p, flat_t = prob.flatten(), truth.flatten() > 0
    wrong = (flat_p >= 0.5) != flat_t
    halves = []
    for is_wrong in (True, False):
        pools = [torch.nonzero((wrong == is_wrong) & (flat_t == cls)).flatten() for cls in (True, False)]
        halves.append([pool for pool in pools if pool.numel()])
    quotas = [count // 2, count - count // 2]
    if not halves[0]:
        quotas = [0, count]
    elif not halves[1]:
        quotas = [count, 0]
    picks = []
    for pools, quota in zip(halves, quotas, strict=True):
        for i, pool in enumerate(pools):
            share = quota // len(pools) + (1 if i < quota % len(pools) else 0)
            picks.append(pool[torch.randint(pool.numel(), (share,), generator=gen, device=pool.device)])
    return torch.cat(picks)


def sample_points(
    prob: torch.Tensor, truth: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> Points:
    """Sample cfg.num_points voxels per patch, spread evenly over its z-slices.

    prob: detached foreground probability (N, Z, Y, X); truth: mask (N, Z, Y, X), > 0 is foreground.
    Mode 'random' (or importance 0) is uniform sampling, the ablation baseline.
    """
    if prob.shape != truth.shape or prob.dim() != 4:
        raise ValueError(f"prob {tuple(prob.shape)} and truth {tuple(truth.shape)} must both be (N, Z, Y, X)")
    gen = generator if generator is not None else torch.Generator(device=prob.device)
    n_patches, depth, height, width = prob.shape
    per_slice = max(1, cfg.num_points // depth)
    ns, zs, flats = [], [], []
    with torch.no_grad():
        for n in range(n_patches):
            for z in range(depth):
                if cfg.mode == "misclassified":
                    flat = _misclassified_pick(prob[n, z], truth[n, z], per_slice, gen)
                elif cfg.mode == "random" or cfg.importance == 0:
                    flat = torch.randint(height * width, (per_slice,), generator=gen, device=prob.device)
                else:
                    flat = _uncertainty_pick(prob[n, z], per_slice, cfg, gen)
                flats.append(flat)
                ns.append(torch.full_like(flat, n))
                zs.append(torch.full_like(flat, z))
        flat = torch.cat(flats)
        n_idx, z_idx = torch.cat(ns), torch.cat(zs)
        y_idx, x_idx = flat // width, flat % width
        label = (truth[n_idx, z_idx, y_idx, x_idx] > 0).long()
    return Points(n_idx, z_idx, y_idx, x_idx, label)
