"""Synthetic EM-like volumes with known mitochondria ground truth (pure numpy/scipy, seeded), and writing them
where a job (the demo's segment input, a training volume) expects a volume that is absent.

Mitochondria are ellipsoids and bent tubes: a dark outer membrane around a mid-grey matrix with darker
cristae stripes. Distractors that are NOT labelled: cell membranes (thin dark sheets), vesicles (small
dark rings), ER-like dark spots and dense lysosome-like blobs. Then blur and noise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import ndimage

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config.segment import SegmentConfig
    from pipeline.config.synthetic import SyntheticVolume
    from pipeline.config.train import DataConfig

logger = logging.getLogger(__name__)

TRAINING_CHUNKS = (32, 128, 128)
"""Chunks (z, y, x voxels) of generated training volumes."""

_BACKGROUND = 160.0
_MATRIX = 105.0
_MEMBRANE = 55.0
_CRISTAE = 70.0


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _box(center: np.ndarray, radius: float, shape: tuple[int, int, int]) -> tuple[slice, ...] | None:
    lo = np.maximum(np.floor(center - radius).astype(int), 0)
    hi = np.minimum(np.ceil(center + radius).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _coords(box: tuple[slice, ...]) -> np.ndarray:
    """Voxel coordinates (3, z, y, x) of a box, as float32."""
    return np.stack(np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in box], indexing="ij"))


def _ellipsoid_distance(box: tuple[slice, ...], center: np.ndarray, axes: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Signed distance-like field in voxels: negative inside the ellipsoid, ~0 on its surface."""
    p = _coords(box) - center[:, None, None, None]
    local = np.einsum("ij,j...->i...", rot.T, p)
    r = np.sqrt(np.sum((local / axes[:, None, None, None]) ** 2, axis=0))
    return (r - 1.0) * axes.min()


def _tube_distance(box: tuple[slice, ...], points: np.ndarray, radius: float) -> np.ndarray:
    """Distance in voxels to a polyline minus the tube radius (negative inside)."""
    p = _coords(box)
    best = np.full(p.shape[1:], np.inf, dtype=np.float32)
    for a, b in zip(points[:-1], points[1:], strict=True):
        ab = (b - a).astype(np.float32)
        ap = p - a[:, None, None, None]
        t = np.clip(np.einsum("i,i...->...", ab, ap) / float(ab @ ab), 0.0, 1.0)
        d = np.sqrt(np.sum((ap - t * ab[:, None, None, None]) ** 2, axis=0))
        best = np.minimum(best, d)
    return best - radius


def _paint_mitochondrion(
    raw: np.ndarray, label: np.ndarray, box: tuple[slice, ...], dist: np.ndarray, rng: np.random.Generator
) -> bool:
    """Paint one mitochondrion given its distance field; refuse (False) if it touches another one."""
    inside = dist < 0
    if inside.sum() < 50 or np.any(label[box][dist < 3]):
        return False
    direction = _random_rotation(rng)[0]
    period = rng.uniform(5.0, 8.0)
    phase = np.einsum("i,i...->...", direction, _coords(box)) * (2 * np.pi / period)
    cristae = (np.sin(phase + rng.uniform(0, 2 * np.pi)) > 0.6) & (dist < -2.5)
    value = np.where(cristae, _CRISTAE, _MATRIX + rng.normal(0, 6))
    value = np.where(dist > -1.8, _MEMBRANE, value)
    region = raw[box]
    region[inside] = value[inside]
    label[box][inside] = 1
    return True


def _smooth_field(shape: tuple[int, int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered noise, computed at low resolution then zoomed for speed."""
    step = max(1, int(sigma // 2))
    small = tuple(max(2, s // step + 1) for s in shape)
    field = ndimage.gaussian_filter(rng.normal(size=small).astype(np.float32), sigma / step, mode="wrap")
    field = ndimage.zoom(field, [s / m for s, m in zip(shape, small, strict=True)], order=1)[
        : shape[0], : shape[1], : shape[2]
    ]
    return (field - field.mean()) / (field.std() + 1e-6)


def generate_volume(
    shape: tuple[int, int, int] = (64, 256, 256),
    seed: int = 0,
    *,
    mito_fraction: float = 0.1,
    noise_std: float = 10.0,
    blur_sigma: float = 0.8,
) -> tuple[np.ndarray, np.ndarray]:
    """An EM-like volume and its mitochondria mask, both uint8 (z, y, x); same seed, same volume.

    `mito_fraction` is the target fraction of mitochondrion voxels (reached approximately).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    raw = np.full(shape, _BACKGROUND, dtype=np.float32)
    raw += 8.0 * _smooth_field(shape, 6.0, rng)
    label = np.zeros(shape, dtype=np.uint8)
    dims = np.array(shape, dtype=np.float32)
    scale = min(1.0, float(min(shape[1:])) / 128.0)

    # cell membranes: thin dark sheets on the zero set of a smooth field
    membrane = np.abs(_smooth_field(shape, 24.0, rng)) < 0.05
    raw[membrane] = 80.0

    target = mito_fraction * label.size
    attempts = 0
    while label.sum(dtype=np.int64) < target and attempts < 400:
        attempts += 1
        center = rng.uniform(0, 1, 3).astype(np.float32) * dims
        if rng.random() < 0.5:
            axes = rng.uniform([6, 8, 14], [12, 14, 30]).astype(np.float32) * scale
            axes = np.maximum(axes, 3.0)
            box = _box(center, float(axes.max()) + 3, shape)
            if box is None:
                continue
            dist = _ellipsoid_distance(box, center, axes, _random_rotation(rng))
        else:
            radius = float(rng.uniform(5, 10) * scale) + 1.5
            steps = rng.normal(size=(3, 3)).astype(np.float32)
            steps /= np.linalg.norm(steps, axis=1, keepdims=True)
            points = center + np.cumsum(steps * rng.uniform(8, 20) * scale, axis=0)
            points = np.vstack([center, points])
            lo, hi = points.min(0) - radius - 3, points.max(0) + radius + 3
            mid = (lo + hi) / 2
            box = _box(mid, float((hi - lo).max() / 2), shape)
            if box is None:
                continue
            dist = _tube_distance(box, points, radius)
        _paint_mitochondrion(raw, label, box, dist, rng)

    free = label == 0
    # vesicles: small dark rings with a light centre
    for _ in range(int(label.size / 6000)):
        center = rng.uniform(0, 1, 3).astype(np.float32) * dims
        radius = float(rng.uniform(2.5, 5.0))
        box = _box(center, radius + 1, shape)
        if box is None:
            continue
        r = np.sqrt(np.sum((_coords(box) - center[:, None, None, None]) ** 2, axis=0))
        ring = (np.abs(r - radius) < 1.0) & free[box]
        raw[box][ring] = 70.0
    # ER-like dark spots and dense lysosome-like blobs
    spots = (_smooth_field(shape, 2.0, rng) > 2.6) & free
    raw[ndimage.binary_dilation(spots, iterations=1) & free] = 85.0
    for _ in range(int(label.size / 150000)):
        center = rng.uniform(0, 1, 3).astype(np.float32) * dims
        axes = rng.uniform(3, 7, 3).astype(np.float32)
        box = _box(center, float(axes.max()) + 1, shape)
        if box is None:
            continue
        blob = (_ellipsoid_distance(box, center, axes, _random_rotation(rng)) < 0) & free[box]
        raw[box][blob] = 40.0

    raw = ndimage.gaussian_filter(raw, blur_sigma)
    raw += rng.normal(0, noise_std, size=shape).astype(np.float32)
    logger.debug("synthetic volume %s seed %d: %.3f foreground", shape, seed, label.mean())
    return np.clip(raw, 0, 255).astype(np.uint8), label


def write_volume_zarr(
    path: str | Path,
    raw: np.ndarray,
    label: np.ndarray,
    *,
    resolution_nm: tuple[float, float, float] = (5.0, 5.0, 5.0),
    chunks: tuple[int, int, int] = TRAINING_CHUNKS,
    zarr_format: Literal[2, 3] = 2,
) -> None:
    """Write raw and label as arrays `raw` and `label` of a zarr group, with Lucchi-style attributes."""
    import zarr

    group = zarr.open_group(str(path), mode="a", zarr_format=zarr_format)
    for name, data in (("raw", raw), ("label", label)):
        arr = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=tuple(min(c, s) for c, s in zip(chunks, data.shape, strict=True)),
            overwrite=True,
        )
        arr[...] = data
        arr.attrs.update({"resolution_nm": [float(r) for r in resolution_nm], "axes": ["z", "y", "x"]})


def resample_volume(raw: np.ndarray, label: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`raw` and `label` resampled to `shape` as if imaged at another voxel size: an anti-aliasing blur where
    voxels grow, linear interpolation, and the label as the voxels more than half covered."""
    factors = [d / s for d, s in zip(raw.shape, shape, strict=True)]
    blurred = ndimage.gaussian_filter(raw.astype(np.float32), [max(0.0, (f - 1) / 2) for f in factors])
    zoom = [s / d for s, d in zip(shape, raw.shape, strict=True)]
    out_raw = ndimage.zoom(blurred, zoom, order=1, grid_mode=True, mode="grid-mirror")
    out_label = ndimage.zoom(label.astype(np.float32), zoom, order=1, grid_mode=True, mode="grid-mirror") >= 0.5
    return np.clip(np.round(out_raw), 0, 255).astype(np.uint8), out_label.astype(np.uint8)


def synthetic_arrays(spec: SyntheticVolume) -> tuple[np.ndarray, np.ndarray]:
    """The EM image and full mitochondria mask of `spec` (uint8, z y x): drawn at `drawn_voxel_size_nm` and
    resampled to `voxel_size_nm` when it is given, else drawn at the volume's shape directly."""
    if spec.drawn_voxel_size_nm is None:
        return generate_volume(spec.shape, seed=spec.seed)
    drawn = tuple(
        max(1, round(s * v / d))
        for s, v, d in zip(spec.shape, spec.voxel_size_nm, spec.drawn_voxel_size_nm, strict=True)
    )
    return resample_volume(*generate_volume(drawn, seed=spec.seed), spec.shape)  # type: ignore[arg-type]


def write_synthetic(
    spec: SyntheticVolume,
    raw_url: str,
    label_url: str | None,
    chunks: Iterable[int],
    ignore_label: int | None = None,
) -> None:
    """Generate `spec`'s volume and write its EM image (uint8) to `raw_url` and its mitochondria mask to
    `label_url` (when given), as new volumes chunked by `chunks` (clipped to the shape); outside the spec's
    `labelled_slices` the mask holds `ignore_label`."""
    from pipeline.volumes import VolumeMeta, create_volume

    raw, label = synthetic_arrays(spec)
    if spec.labelled_slices is not None:
        if ignore_label is None or ignore_label > 255:
            raise ConfigError(
                f"synthetic volume {raw_url} labels slices {spec.labelled_slices} only: give the volume an "
                f"ignore_label in 1..255 (got {ignore_label})"
            )
        sparse = np.full_like(label, ignore_label)
        sparse[spec.labelled_slices] = label[spec.labelled_slices]
        label = sparse
    clipped = tuple(min(c, s) for c, s in zip(chunks, spec.shape, strict=True))
    meta = VolumeMeta(shape=spec.shape, dtype=np.dtype(np.uint8), chunks=clipped, voxel_size_nm=spec.voxel_size_nm)  # type: ignore[arg-type]
    create_volume(raw_url, meta).write(meta.roi, raw[None])
    if label_url:
        create_volume(label_url, meta.derive(layer_type="segmentation")).write(meta.roi, label[None])


def ensure_synthetic_input(config: SegmentConfig) -> bool:
    """Generate a segment job's synthetic input (and truth) when it asks for one and the input is absent; True if
    generated."""
    from pipeline.volumes import volume_exists

    spec = config.synthetic
    if spec is None or volume_exists(config.input):
        return False
    logger.info(
        "input %s is absent: generating a synthetic EM volume %s (seed %d)", config.input, spec.shape, spec.seed
    )
    write_synthetic(spec, config.input, spec.truth, config.chunk_size)
    return True


def ensure_synthetic_training_data(cfg: DataConfig) -> None:
    """Generate the synthetic volumes a training config asks for when their raw or label volume is absent."""
    from pipeline.volumes import volume_exists

    for source in cfg.volumes:
        if source.synthetic is None or (volume_exists(source.raw) and volume_exists(source.label)):
            continue
        logger.info("generating synthetic volume %s (seed %d)", source.raw, source.synthetic.seed)
        write_synthetic(source.synthetic, source.raw, source.label, TRAINING_CHUNKS, source.ignore_label)
