"""Training data: regions of raw/label volumes read once into memory, random (augmented) patches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from daisy import Roi

from pipeline.config.train import AugmentConfig, DataConfig, Region, VolumeSource
from pipeline.errors import ConfigError, GeometryError
from pipeline.network.inputs import recorded_voxel_size, scale_input
from pipeline.stitching import mirror_indices
from pipeline.training.augment import augment
from pipeline.training.targets import IGNORE

if TYPE_CHECKING:
    from pipeline.volumes import Volume

logger = logging.getLogger(__name__)


@dataclass
class LabelledRegion:
    """A raw region (uint8, Z Y X) and its label (uint8: 1 mitochondrion, 0 background, IGNORE unannotated), with
    where it came from and its voxel size (z, y, x) in nm (None: unknown)."""

    raw: np.ndarray
    label: np.ndarray
    name: str
    voxel_size_nm: tuple[float, float, float] | None = None


def _roi(region: Region, shape: tuple[int, int, int], what: str) -> Roi:
    ranges = [
        rng if rng is not None else (0, size) for rng, size in zip((region.z, region.y, region.x), shape, strict=True)
    ]
    if any(stop > size for (_, stop), size in zip(ranges, shape, strict=True)):
        raise GeometryError(
            f"{what} region z,y,x = {ranges} is outside the volume of shape {shape}; give ranges inside it"
        )
    return Roi(tuple(r[0] for r in ranges), tuple(r[1] - r[0] for r in ranges))


def open_pair(raw_url: str, label_url: str) -> tuple[Volume, Volume]:
    """Open a raw and a label volume and check that they match (before any training step)."""
    from pipeline.volumes import open_volume

    raw, label = open_volume(raw_url), open_volume(label_url)
    if tuple(raw.meta.shape) != tuple(label.meta.shape):
        raise GeometryError(
            f"label volume {label_url} has shape {tuple(label.meta.shape)} but raw volume {raw_url} has "
            f"{tuple(raw.meta.shape)}: give a label volume that covers the raw volume voxel for voxel"
        )
    if raw.meta.num_channels != 1 or label.meta.num_channels != 1:
        raise GeometryError(f"{raw_url} and {label_url} must have one channel each")
    if np.dtype(raw.meta.dtype) != np.uint8:
        raise ConfigError(f"raw volume {raw_url} holds {raw.meta.dtype}; training expects uint8 EM data")
    return raw, label


def training_label(label: np.ndarray, ignore_label: int | None, annotated: np.ndarray | None) -> np.ndarray:
    """A label region as training uses it: 1 where > 0, 0 elsewhere, IGNORE where the value is `ignore_label` or
    the `annotated` mask (same shape) is 0."""
    out = (label > 0).astype(np.uint8)
    if ignore_label is not None:
        out[label == ignore_label] = IGNORE
    if annotated is not None:
        out[annotated == 0] = IGNORE
    return out


def _read_annotated(source: VolumeSource, roi: Roi, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The `annotated_mask` of `source` in `roi`, checked to cover the label volume voxel for voxel."""
    if source.annotated_mask is None:
        return None
    from pipeline.volumes import open_volume

    mask = open_volume(source.annotated_mask)
    if tuple(mask.meta.shape) != tuple(shape) or mask.meta.num_channels != 1:
        raise GeometryError(
            f"annotated_mask {source.annotated_mask} has shape {tuple(mask.meta.shape)} x{mask.meta.num_channels} "
            f"channels but label volume {source.label} has {tuple(shape)}: give a one-channel mask of the label's shape"
        )
    return mask.read(roi)[0]


def load_regions(cfg: DataConfig, which: str) -> list[LabelledRegion]:
    """Read the `which` ('train' or 'validation') region of every volume into memory."""
    out = []
    for index, source in enumerate(cfg.volumes):
        region = getattr(source, which)
        if region is None:
            continue
        raw_vol, label_vol = open_pair(source.raw, source.label)
        roi = _roi(region, raw_vol.meta.shape, f"{which} of volume {index} ({source.raw})")
        if which == "train" and any(s < p for s, p in zip(roi.shape, cfg.patch_shape, strict=True)):
            raise ConfigError(
                f"train region {roi} of {source.raw} is smaller than data.patch_shape {list(cfg.patch_shape)}"
            )
        raw = raw_vol.read(roi)[0]
        label = training_label(
            label_vol.read(roi)[0], source.ignore_label, _read_annotated(source, roi, raw_vol.meta.shape)
        )
        annotated = label != IGNORE
        if not annotated.any():
            raise ConfigError(
                f"{which} region {roi} of {source.label} has no annotated voxel (all are ignore_label or outside "
                "annotated_mask): give a region that holds labelled voxels"
            )
        out.append(LabelledRegion(raw, label, f"{source.raw}[{which}]", recorded_voxel_size(raw_vol)))
        logger.info(
            "%s: %s voxels, %.3f annotated, %.3f of them foreground",
            out[-1].name,
            raw.shape,
            annotated.mean(),
            (label == 1).sum() / annotated.sum(),
        )
    return out


def _coarse_coords(mask: np.ndarray) -> np.ndarray:
    """Coordinates of the voxels of `mask` on every 4th (y, x) voxel (small enough to keep), or of all its voxels
    when that grid misses them all (small boxes)."""
    coords = np.argwhere(mask[:, ::4, ::4]) * np.array([1, 4, 4])
    return coords if len(coords) or not mask.any() else np.argwhere(mask)


def crop_mirrored(array: np.ndarray, start: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The box `start`..`start + shape` of `array` (a copy), mirrored past its borders as `segment` pads volumes."""
    axes = (mirror_indices(int(s), int(s) + p, n) for s, p, n in zip(start, shape, array.shape, strict=True))
    return array[np.ix_(*axes)]


class PatchSampler:
    """Random training patches with foreground over-sampling and augmentation."""

    def __init__(self, regions: list[LabelledRegion], cfg: DataConfig, augment_cfg: AugmentConfig) -> None:
        if not regions:
            raise ConfigError("no training region: give at least one volume with a `train` region")
        self.regions = regions
        self.cfg = cfg
        self.augment_cfg = augment_cfg
        self.weights = np.array([np.count_nonzero(r.label != IGNORE) for r in regions], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.foreground = [_coarse_coords(region.label == 1) for region in regions]
        # per region, the voxels patches are centred on when its labels are sparse; None = all annotated
        self.annotated = [None if (r.label != IGNORE).all() else _coarse_coords(r.label != IGNORE) for r in regions]

    def start(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """A random patch origin in region `index`: on a foreground voxel with probability
        `foreground_oversample`, else anywhere (on an annotated voxel where the labels are sparse), and up to
        `border_overhang` of the patch shape past the region's borders."""
        shape = np.array(self.cfg.patch_shape)
        reach = (shape * self.cfg.border_overhang).astype(int)
        low, high = -reach, np.array(self.regions[index].raw.shape) - shape + reach
        fg, annotated = self.foreground[index], self.annotated[index]
        if len(fg) and rng.random() < self.cfg.foreground_oversample:
            centre = fg[int(rng.integers(len(fg)))]
            return np.clip(centre - rng.integers(0, shape), low, high)
        if annotated is not None:
            centre = annotated[int(rng.integers(len(annotated)))]
            return np.clip(centre - rng.integers(0, shape), low, high)
        return np.array([int(rng.integers(a, b + 1)) for a, b in zip(low, high, strict=True)])

    def patch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One augmented patch: raw float32 in [0, 1] and label uint8 (0, 1, IGNORE), both of shape
        data.patch_shape."""
        index = int(rng.choice(len(self.regions), p=self.weights))
        region = self.regions[index]
        start = self.start(index, rng)
        raw = scale_input(crop_mirrored(region.raw, start, self.cfg.patch_shape))
        return augment(raw, crop_mirrored(region.label, start, self.cfg.patch_shape), self.augment_cfg, rng)

    def batch(self, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A batch: raw (B, 1, Z, Y, X) float32 and label (B, Z, Y, X) uint8."""
        pairs = [self.patch(rng) for _ in range(size)]
        return np.stack([p[0] for p in pairs])[:, None], np.stack([p[1] for p in pairs])
