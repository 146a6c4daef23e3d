"""Training augmentations on (Z, Y, X) numpy patches: geometry applied to raw and label alike."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.config.train import AugmentConfig


def augment(
    raw: np.ndarray, label: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Augment a float32 raw patch in [0, 1] and its label patch (same shape); returns new arrays."""
    if cfg.flip:
        for axis in range(3):
            if rng.random() < 0.5:
                raw, label = np.flip(raw, axis), np.flip(label, axis)
    if cfg.rot90 and raw.shape[1] == raw.shape[2]:
        k = int(rng.integers(4))
        raw, label = np.rot90(raw, k, axes=(1, 2)), np.rot90(label, k, axes=(1, 2))
    raw, label = np.ascontiguousarray(raw, dtype=np.float32), np.ascontiguousarray(label)
    if rng.random() < cfg.elastic:
        raw, label = _elastic(raw, label, cfg, rng)
    if rng.random() < cfg.misalignment and raw.shape[0] > 1:
        start = int(rng.integers(1, raw.shape[0]))
        shift = rng.integers(-cfg.misalignment_max, cfg.misalignment_max + 1, size=2)
        raw[start:] = np.roll(raw[start:], tuple(shift), axis=(1, 2))
        label[start:] = np.roll(label[start:], tuple(shift), axis=(1, 2))
    if rng.random() < cfg.intensity:
        s = cfg.intensity_strength
        raw = raw * (1 + rng.uniform(-s, s)) + rng.uniform(-s, s) / 2
        raw = np.clip(raw, 0, 1) ** np.exp(rng.uniform(-s, s))
    if rng.random() < cfg.blur:
        raw = ndimage.gaussian_filter(raw, (0, *(2 * [rng.uniform(0.5, 1.5)])))
    if rng.random() < cfg.missing_section:
        raw[int(rng.integers(raw.shape[0]))] = raw.mean()
    return np.clip(raw, 0, 1).astype(np.float32), label


def _elastic(
    raw: np.ndarray, label: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth in-plane displacement, the same for every slice (cheap, keeps z alignment)."""
    _, height, width = raw.shape
    fields = []
    for _ in range(2):
        f = ndimage.gaussian_filter(rng.normal(size=(height, width)), cfg.elastic_sigma)
        fields.append(f / (np.abs(f).max() + 1e-8) * cfg.elastic_alpha)
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    coords = np.stack([yy + fields[0], xx + fields[1]])
    out_raw = np.empty_like(raw)
    out_label = np.empty_like(label)
    for z in range(raw.shape[0]):
        out_raw[z] = ndimage.map_coordinates(raw[z], coords, order=1, mode="reflect")
        out_label[z] = ndimage.map_coordinates(label[z], coords, order=0, mode="reflect")
    return out_raw, out_label
