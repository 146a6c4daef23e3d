"""Hard-example point sampling for the contrastive loss (PointRend-style; training only).

Points are drawn per patch and per z-slice on the detached foreground probability, among annotated voxels only
where labels are sparse; each point takes its class from the ground-truth mask at the same voxel (the embedding is
at full resolution).
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


def _random_pick(plane: int, count: int, pool: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """`count` flat indices drawn uniformly from a plane of `plane` voxels, or from `pool` (flat indices) if given."""
    if pool is None:
        return torch.randint(plane, (count,), generator=gen, device=gen.device)
    return pool[torch.randint(pool.numel(), (count,), generator=gen, device=pool.device)]


def _uncertainty_pick(
    prob: torch.Tensor, count: int, cfg: SamplingConfig, gen: torch.Generator, pool: torch.Tensor | None
) -> torch.Tensor:
    """Flat (y*X + x) indices in one slice (within `pool` if given): beta*count most uncertain of k*count
    candidates, rest random."""
    plane = prob.numel()
    hard = int(round(cfg.importance * count))
    chosen = []
    if hard > 0:
        candidates = _random_pick(plane, cfg.oversample * count, pool, gen)
        uncertainty = (prob.flatten()[candidates] - 0.5).abs()
        chosen.append(candidates[torch.topk(-uncertainty, hard).indices])
    if count - hard > 0:
        chosen.append(_random_pick(plane, count - hard, pool, gen))
    return torch.cat(chosen)


def _misclassified_pick(
    prob: torch.Tensor, truth: torch.Tensor, count: int, gen: torch.Generator, pool: torch.Tensor | None
) -> torch.Tensor:
    """Half misclassified, half correctly classified voxels (within `pool` if given), each half split evenly over
    the classes present in it; a half with no voxels at all gives its share to the other half."""
    flat_p, flat_t = prob.flatten(), truth.flatten() > 0
    if pool is not None:
        flat_p, flat_t = flat_p[pool], flat_t[pool]
    wrong = (flat_p >= 0.5) != flat_t
    halves = []
    for is_wrong in (True, False):
        pools = [torch.nonzero((wrong == is_wrong) & (flat_t == cls)).flatten() for cls in (True, False)]
        halves.append([part for part in pools if part.numel()])
    quotas = [count // 2, count - count // 2]
    if not halves[0]:
        quotas = [0, count]
    elif not halves[1]:
        quotas = [count, 0]
    picks = []
    for pools, quota in zip(halves, quotas, strict=True):
        for i, part in enumerate(pools):
            share = quota // len(pools) + (1 if i < quota % len(pools) else 0)
            picks.append(part[torch.randint(part.numel(), (share,), generator=gen, device=part.device)])
    picked = torch.cat(picks)
    return picked if pool is None else pool[picked]


def sample_points(
    prob: torch.Tensor,
    truth: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    annotated: torch.Tensor | None = None,
) -> Points:
    """Sample cfg.num_points voxels per patch, spread evenly over its z-slices that hold annotated voxels.

    prob: detached foreground probability (N, Z, Y, X); truth: mask (N, Z, Y, X), > 0 is foreground; annotated:
    boolean (N, Z, Y, X), where points may lie (None: everywhere). Mode 'random' (or importance 0) is uniform
    sampling, the ablation baseline.
    """
    if prob.shape != truth.shape or prob.dim() != 4:
        raise ValueError(f"prob {tuple(prob.shape)} and truth {tuple(truth.shape)} must both be (N, Z, Y, X)")
    if annotated is not None and annotated.shape != prob.shape:
        raise ValueError(f"annotated {tuple(annotated.shape)} must have the shape of prob {tuple(prob.shape)}")
    gen = generator if generator is not None else torch.Generator(device=prob.device)
    n_patches, depth, height, width = prob.shape
    ns, zs, flats = [], [], []
    with torch.no_grad():
        for n in range(n_patches):
            pools: list[torch.Tensor | None] = [None] * depth
            if annotated is not None:  # only the slices with annotated voxels, each among its annotated voxels
                pools = [torch.nonzero(annotated[n, z].flatten())[:, 0] for z in range(depth)]
            slices = [(z, pool) for z, pool in enumerate(pools) if pool is None or pool.numel()]
            per_slice = max(1, cfg.num_points // max(1, len(slices)))
            for z, pool in slices:
                if cfg.mode == "misclassified":
                    flat = _misclassified_pick(prob[n, z], truth[n, z], per_slice, gen, pool)
                elif cfg.mode == "random" or cfg.importance == 0:
                    flat = _random_pick(height * width, per_slice, pool, gen)
                else:
                    flat = _uncertainty_pick(prob[n, z], per_slice, cfg, gen, pool)
                flats.append(flat)
                ns.append(torch.full_like(flat, n))
                zs.append(torch.full_like(flat, z))
        empty = torch.zeros(0, dtype=torch.long, device=prob.device)
        flat = torch.cat(flats) if flats else empty
        n_idx, z_idx = (torch.cat(ns), torch.cat(zs)) if flats else (empty, empty)
        y_idx, x_idx = flat // width, flat % width
        label = (truth[n_idx, z_idx, y_idx, x_idx] > 0).long()
    return Points(n_idx, z_idx, y_idx, x_idx, label)
