"""Seam-free stitching: one patch grid over the volume, mirror padding, weighted blending.

Every voxel is predicted by the same patches whatever the block partition, worker count or sub-ROI:
patch positions depend only on the volume's shape, padding only on the volume borders, and the weighted
sum runs over the patches in global grid order. A block's result therefore equals the same voxels of a
one-block run. The network is passed in as a function, of one patch or of a batch of patches; the input, and so the
sums, are NumPy arrays or torch tensors on the network's device (a GPU worker blends there and copies back only the
finished block).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import numpy as np
from daisy import Roi

from pipeline.errors import GeometryError
from pipeline.geometry import Vec3
from pipeline.median_filter import median_filter, to_uint8

if TYPE_CHECKING:  # the scheduler imports this module without torch
    import torch

Blending = Literal["gaussian", "bump", "constant"]

Array: TypeAlias = "np.ndarray | torch.Tensor"
PatchFn: TypeAlias = Callable[[Any], Any]
"""An input patch (C, *patch_shape) to the probabilities of its output tile (K, *tile_shape)."""


@lru_cache(maxsize=64)
def axis_starts(size: int, out: int, stride: int) -> tuple[int, ...]:
    """Tile starts along one axis of length `size`: multiples of `stride` from 0, the last moved back to end at the
    border (`size - out`), so that no tile reaches past the volume; one tile at 0 when the axis is shorter."""
    last = max(size - out, 0)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return tuple(starts)


@dataclass(frozen=True)
class PatchGrid:
    """Network patches over one volume: input shape, margin cropped per side, stride between output tiles, and the
    volume's shape, which bounds the grid.

    Output tiles stay inside the volume (`axis_starts`), as nnU-Net and MONAI place sliding windows: a tile that
    hung past a border would be predicted mostly from mirrored data, which adds false objects along the volume's
    faces. Only the context of border tiles is mirrored.
    """

    patch_shape: Vec3
    context: Vec3
    stride: Vec3
    volume_shape: Vec3

    def __post_init__(self) -> None:
        out = self.output_shape
        if any(o <= 0 for o in out):
            raise GeometryError(f"patch {self.patch_shape} is not larger than twice the context {self.context}")
        if any(s <= 0 or s > o for s, o in zip(self.stride, out, strict=True)):
            raise GeometryError(f"stride {self.stride} must be between 1 and the patch output shape {out}")

    @classmethod
    def with_overlap(
        cls, patch_shape: Vec3, context: Vec3, overlap: float | Sequence[float], volume_shape: Vec3
    ) -> PatchGrid:
        """A grid over `volume_shape` whose output tiles overlap by the fraction `overlap` of their size (one
        fraction, or one per axis)."""
        out = [p - 2 * c for p, c in zip(patch_shape, context, strict=True)]
        fractions = [float(overlap)] * 3 if isinstance(overlap, int | float) else [float(f) for f in overlap]
        stride = tuple(max(1, int(round(o * (1.0 - f)))) for o, f in zip(out, fractions, strict=True))
        return cls(tuple(patch_shape), tuple(context), stride, tuple(volume_shape))  # type: ignore[arg-type]

    @property
    def output_shape(self) -> Vec3:
        return tuple(p - 2 * c for p, c in zip(self.patch_shape, self.context, strict=True))  # type: ignore[return-value]

    def _axis_starts_meeting(self, axis: int, begin: int, end: int) -> tuple[int, ...]:
        """Tile starts along `axis` whose tiles meet [begin, end)."""
        out = self.output_shape[axis]
        starts = axis_starts(self.volume_shape[axis], out, self.stride[axis])
        return starts[bisect.bisect_right(starts, begin - out) : bisect.bisect_left(starts, end)]

    def _starts_meeting(self, roi: Roi) -> list[tuple[int, ...]]:
        """Per axis, the tile starts whose tiles meet `roi`."""
        return [self._axis_starts_meeting(a, b, e) for a, (b, e) in enumerate(zip(roi.begin, roi.end, strict=True))]

    def tiles_computed(self, roi: Roi, block_shape: Vec3) -> int:
        """Tiles a run over `roi` in blocks of `block_shape` (anchored at the origin) computes: a tile meeting
        several blocks is computed by each. Counted per axis (O(blocks per axis)), for sizing a job."""
        total = 1
        for axis, (b, e, size) in enumerate(zip(roi.begin, roi.end, block_shape, strict=True)):
            edges = [b, *range((b // size + 1) * size, e, size), e]
            total *= sum(len(self._axis_starts_meeting(axis, lo, hi)) for lo, hi in itertools.pairwise(edges))
        return total

    def tiles(self, roi: Roi) -> Iterator[Roi]:
        """Output tiles that meet `roi`, in global grid order (the order every block sums them in)."""
        for start in itertools.product(*self._starts_meeting(roi)):
            yield Roi(start, self.output_shape)

    def read_roi(self, write_roi: Roi) -> Roi:
        """The input region every patch that predicts `write_roi` needs: past the volume by the context (by more only
        on an axis shorter than one tile)."""
        starts = self._starts_meeting(write_roi)
        begin = [s[0] - c for s, c in zip(starts, self.context, strict=True)]
        end = [s[-1] + o + c for s, o, c in zip(starts, self.output_shape, self.context, strict=True)]
        return Roi(begin, [e - b for e, b in zip(end, begin, strict=True)])


def mirror_indices(begin: int, end: int, size: int) -> np.ndarray:
    """Indices into [0, size) for positions begin..end-1, reflected at the borders (no edge repeat)."""
    pos = np.arange(begin, end)
    if size == 1:
        return np.zeros_like(pos)
    period = 2 * (size - 1)
    pos = np.mod(pos, period)
    return np.where(pos < size, pos, period - pos)


def read_mirrored(read: Callable[[Roi], np.ndarray], roi: Roi, volume_shape: Vec3) -> np.ndarray:
    """Read `roi`, filling the parts outside the volume by mirroring at the volume borders.

    Only the volume's bounding part of the region is read; the padding depends on the volume only,
    never on the block, so all blocks see the same padded data.
    """
    index = [mirror_indices(b, e, s) for b, e, s in zip(roi.begin, roi.end, volume_shape, strict=True)]
    lo = [int(i.min()) for i in index]
    hi = [int(i.max()) + 1 for i in index]
    data = read(Roi(lo, [h - low for h, low in zip(hi, lo, strict=True)]))
    local = [i - low for i, low in zip(index, lo, strict=True)]
    return data[:, local[0]][:, :, local[1]][:, :, :, local[2]]


@lru_cache(maxsize=8)
def blend_weights(shape: Vec3, kind: Blending = "gaussian") -> np.ndarray:
    """Per-voxel weights of one output tile: high in the centre, low (never zero) at the edges."""
    axes = []
    for n in shape:
        x = (np.arange(n, dtype=np.float64) + 0.5) / n - 0.5  # in (-0.5, 0.5)
        if kind == "gaussian":
            w = np.exp(-0.5 * (x / 0.125) ** 2)  # sigma = 1/8 of the tile, as nnU-Net and MONAI use
        elif kind == "bump":
            w = np.exp(1.0 - 1.0 / np.clip(1.0 - (2 * x) ** 2, 1e-6, None))
        else:
            w = np.ones(n)
        axes.append(w)
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = np.maximum(weights / weights.max(), 1e-3).astype(np.float32)
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=8)
def _weights_on(shape: Vec3, kind: Blending, device: str) -> torch.Tensor:
    """`blend_weights` as a tensor on `device`: copied there once per worker process."""
    import torch

    return torch.tensor(blend_weights(shape, kind), device=device)


@dataclass(frozen=True)
class Batched:
    """A network that predicts a batch of patches per call: (N, C, *patch_shape) -> (N, K, *tile_shape), NumPy or
    torch as its input. `predict_region` calls it with batches of one shape (the last one padded)."""

    fn: Callable[[Any], Any]


@overload
def predict_region(
    raw: np.ndarray,
    read_roi: Roi,
    write_roi: Roi,
    grid: PatchGrid,
    forward: PatchFn | Batched,
    blending: Blending = ...,
    batch_size: int = ...,
) -> np.ndarray: ...


@overload
def predict_region(
    raw: torch.Tensor,
    read_roi: Roi,
    write_roi: Roi,
    grid: PatchGrid,
    forward: PatchFn | Batched,
    blending: Blending = ...,
    batch_size: int = ...,
) -> torch.Tensor: ...


def predict_region(
    raw: Array,
    read_roi: Roi,
    write_roi: Roi,
    grid: PatchGrid,
    forward: PatchFn | Batched,
    blending: Blending = "gaussian",
    batch_size: int = 1,
) -> Array:
    """Blend the network's patch outputs over `write_roi` from the input `raw` covering `read_roi`.

    `forward` maps an input patch (C, *patch_shape) to the probabilities of its cropped output (K, *output_shape),
    or is `Batched`: then tiles go to it `batch_size` at a time in global grid order, the last batch filled up by
    repeating its last patch (every call has the same shape, so a tile's output does not depend on the block it
    is in; the extra outputs are dropped). Either way the tiles are summed one by one in global grid order.
    Only the write region is accumulated, so memory stays that of one block; a torch `raw` is blended on its
    device, and the result is a tensor there.
    """
    if isinstance(raw, np.ndarray):
        weights: Array = blend_weights(grid.output_shape, blending)
    else:
        weights = _weights_on(grid.output_shape, blending, str(raw.device))
    acc: Any = None
    norm = _zeros(write_roi.shape, raw)
    tiles = list(grid.tiles(write_roi))
    for first in range(0, len(tiles), batch_size):
        batch = tiles[first : first + batch_size]
        patches = [raw[(slice(None), *_local(t.grow(grid.context, grid.context), read_roi))] for t in batch]
        if isinstance(forward, Batched):
            padded = patches + patches[-1:] * (batch_size - len(patches))
            outputs = forward.fn(_stack(padded))
        else:
            outputs = [forward(p) for p in patches]
        for n, tile in enumerate(batch):
            probs = outputs[n]
            if acc is None:
                acc = _zeros((probs.shape[0], *write_roi.shape), raw)
            part = tile.intersect(write_roi)
            in_tile = _local(part, tile)
            in_block = _local(part, write_roi)
            w = weights[in_tile]
            acc_part, norm_part = acc[(slice(None), *in_block)], norm[in_block]  # views: summed in place
            acc_part += probs[(slice(None), *in_tile)] * w  # a multiply, then an add: NumPy's rounding in torch too
            norm_part += w
    assert acc is not None  # a non-empty write region always meets at least one tile
    return acc / norm


def _zeros(shape: Sequence[int], like: Array) -> Array:
    """float32 zeros of `shape`, NumPy or torch on the device of `like`."""
    if isinstance(like, np.ndarray):
        return np.zeros(tuple(shape), dtype=np.float32)
    import torch

    return torch.zeros(tuple(shape), dtype=torch.float32, device=like.device)


def _stack(patches: list[Any]) -> Array:
    """Patches of one shape as one batch, NumPy or torch as they are."""
    if isinstance(patches[0], np.ndarray):
        return np.stack(patches)
    import torch

    return torch.stack(patches)


def tile_forward(
    forward: PatchFn | Batched, median_size: int = 0, trim: Vec3 = (0, 0, 0), threads: int = 1
) -> PatchFn | Batched:
    """A tile's probabilities from a patch (or a batch's from a `Batched` batch): `forward` (the network, its context
    cropped), a `median_size`^3 median filter inside the tile (on `threads` CPU threads), then `trim` voxels cut from
    each side.

    Filtering each tile before blending, rather than the blended volume, keeps every tile's result a function of
    its patch alone: a block needs no prediction beyond its own tiles, so tiles aligned with blocks are computed
    once. A trim of at least `median_size // 2` cuts the filter's edge, where its window leaves the tile.
    """
    if median_size <= 1 and not any(trim):
        return forward
    network = forward.fn if isinstance(forward, Batched) else forward

    def tile(patches: Any) -> Any:
        probs = median_filter(network(patches), median_size, threads)
        return probs[(..., *(slice(t, n - t) for t, n in zip(trim, probs.shape[-3:], strict=True)))]

    return Batched(tile) if isinstance(forward, Batched) else tile


def _local(roi: Roi, frame: Roi) -> tuple[slice, slice, slice]:
    """Slices of `roi` inside an array that covers `frame`."""
    return tuple(slice(b - f, e - f) for b, e, f in zip(roi.begin, roi.end, frame.begin, strict=True))  # type: ignore[return-value]


def to_output_dtype(probs: Array, dtype: str) -> np.ndarray:
    """Probabilities in [0, 1] as stored, in host memory: uint8 (probability x 255, rounded), float16 or float32.

    A tensor is converted on its device, so a GPU sends back a quarter of the bytes for uint8."""
    if dtype == "uint8":
        stored = to_uint8(probs)
    elif isinstance(probs, np.ndarray):
        stored = probs.astype(dtype)
    else:
        import torch

        stored = probs.to(getattr(torch, dtype))
    return stored if isinstance(stored, np.ndarray) else stored.cpu().numpy()
