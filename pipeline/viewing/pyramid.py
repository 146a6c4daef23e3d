"""Down-sampled scale levels (a pyramid) for a written volume, block by block on Dask.

Images and probabilities are averaged, labels take the most frequent value of each window. Each level
halves the axes whose voxel size is below twice the finest one (anisotropic EM first becomes isotropic),
down to a few chunks across. Precomputed layers get new scales in their `info`; OME-Zarr groups get
arrays `s1`, `s2`, … and their `multiscales` metadata. Every level is written by blocks of whole chunks, so
no two workers write the same chunk, and is read back from the level above it.

A sharded level 0 makes every level sharded: the same shard shape in voxels (a coarser level has fewer shards
of the same size), clipped to the level's whole chunks; then a level's blocks are whole shards of it. For
precomputed, clipping keeps a shard a 2^n-chunk Morton box (`sharding_spec`), as it is at level 0.

A finished pyramid is recorded in the volume's run state (`<volume>.mitoseg/pyramid.json`, with the key of the
job that wrote level 0), so a re-run of an unchanged job skips it, and one whose pyramid failed builds it again.
"""

from __future__ import annotations

import json
import logging
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from daisy import Block, Roi

from pipeline.errors import StorageError
from pipeline.execution import BlockFailure, RunResult, run_blockwise
from pipeline.geometry import Vec3, whole_chunks
from pipeline.plan import BlockPlan, plan_blocks
from pipeline.resume import state_location
from pipeline.storage import filesystem
from pipeline.volumes import VolumeMeta, open_volume, parse_volume_url
from pipeline.volumes.precomputed_volume import PrecomputedVolume, sharding_spec
from pipeline.volumes.zarr_volume import ZarrVolume, ome_multiscales_attrs

log = logging.getLogger(__name__)

Method = Literal["mean", "mode"]
DEFAULT_BLOCK_VOXELS: Vec3 = (64, 128, 128)
"""Approximate (z, y, x) size of a write block of a level; rounded to whole chunks."""


@dataclass(frozen=True)
class Level:
    """One scale level: its factor against the level above and against level 0, shape and placement.

    Windows are aligned to the grid of absolute voxel coordinates (as precomputed scales require): the first
    window of an axis starts `phase` voxels before the level above begins, when its offset is not a multiple
    of the factor.
    """

    index: int
    factor: Vec3
    total_factor: Vec3
    shape: Vec3
    voxel_offset: Vec3 = (0, 0, 0)
    phase: Vec3 = (0, 0, 0)
    shards: Vec3 | None = None
    """Shard (z, y, x voxels) of the level when the volume is sharded; None: one file per chunk."""


@dataclass
class PyramidResult:
    """Levels written (index 1 up) with the run of each; stops at the first level with failed blocks."""

    url: str
    levels: list[Level] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(run.ok for run in self.runs)

    @property
    def failed(self) -> int:
        return sum(run.failed for run in self.runs)

    @property
    def failures(self) -> list[BlockFailure]:
        """The failed blocks of every level, each named by its volume and level."""
        return [
            replace(failure, unit=f"{self.url} pyramid s{level.index} block")
            for level, run in zip(self.levels, self.runs, strict=True)
            for failure in run.failures
        ]


def _record_path(url: str) -> tuple[Any, str]:
    return filesystem(f"{state_location(parse_volume_url(url).location)}/pyramid.json")


def _record(url: str, key: str, levels: int) -> None:
    fs, path = _record_path(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, json.dumps({"job_key": key, "levels": levels}).encode())


def pyramid_is_current(url: str, key: str) -> bool:
    """Whether the pyramid of `url` was finished for the job `key` (the one that wrote its level 0)."""
    fs, path = _record_path(url)
    try:
        return bool(json.loads(fs.cat_file(path)).get("job_key") == key)
    except FileNotFoundError:
        return False
    except Exception as err:
        raise StorageError(f"cannot read the pyramid record {path} of {url}: {err}") from err


def pyramid_levels(
    shape: Vec3,
    chunks: Vec3,
    voxel_size_nm: tuple[float, float, float],
    min_chunks_across: int = 2,
    max_levels: int = 8,
    voxel_offset: Vec3 = (0, 0, 0),
    shards: Vec3 | None = None,
) -> list[Level]:
    """Levels 1.. for a volume: halve the axes finer than twice the finest voxel size, until every axis
    spans at most `min_chunks_across` chunks (or `max_levels` levels). With level 0's `shards` (z, y, x voxels),
    each level's shard is that shape clipped to the level's whole chunks."""
    levels: list[Level] = []
    size, res, total, offset = list(shape), list(voxel_size_nm), [1, 1, 1], list(voxel_offset)
    while len(levels) < max_levels and any(-(-s // c) > min_chunks_across for s, c in zip(size, chunks, strict=True)):
        finest = min(r for r, s in zip(res, size, strict=True) if s > 1)
        factor = [2 if s > 1 and r < 2 * finest else 1 for s, r in zip(size, res, strict=True)]
        phase = [o % f for o, f in zip(offset, factor, strict=True)]
        size = [-(-(p + s) // f) for p, s, f in zip(phase, size, factor, strict=True)]
        offset = [o // f for o, f in zip(offset, factor, strict=True)]
        res = [r * f for r, f in zip(res, factor, strict=True)]
        total = [t * f for t, f in zip(total, factor, strict=True)]
        level = Level(len(levels) + 1, *(tuple(v) for v in (factor, total, size, offset, phase)))  # type: ignore[arg-type]
        levels.append(level if shards is None else replace(level, shards=_clip_to_chunks(shards, chunks, level.shape)))
    return levels


def _clip_to_chunks(shards: Vec3, chunks: Vec3, shape: Vec3) -> Vec3:
    """`shards` clipped on each axis to the whole chunks that cover `shape` (a shard never passes the level)."""
    return tuple(min(s, -(-n // c) * c) for s, c, n in zip(shards, chunks, shape, strict=True))  # type: ignore[return-value]


def _windows(data: np.ndarray, factor: Vec3, phase: Vec3, fill: Any) -> np.ndarray:
    """(C, Z, Y, X) data padded with `fill` to whole windows (`phase` voxels before, the rest after), as
    (C, Z', Y', X', window voxels)."""
    pad = [(0, 0)] + [(p, -(p + s) % f) for s, f, p in zip(data.shape[1:], factor, phase, strict=True)]
    padded = np.pad(data, pad, constant_values=fill)
    c, (z, y, x), (fz, fy, fx) = data.shape[0], (s // f for s, f in zip(padded.shape[1:], factor, strict=True)), factor
    grid = padded.reshape(c, z, fz, y, fy, x, fx).transpose(0, 1, 3, 5, 2, 4, 6)
    return grid.reshape(c, z, y, x, fz * fy * fx)


def downsample(data: np.ndarray, factor: Vec3, method: Method, phase: Vec3 = (0, 0, 0)) -> np.ndarray:
    """Down-sample (C, Z, Y, X) `data` by `factor`, the first windows starting `phase` voxels before the data;
    windows cut by the border use the voxels they hold.

    `mean` rounds to the nearest integer for integer types; `mode` breaks ties by the first voxel of the
    window in (z, y, x) order.
    """
    if factor == (1, 1, 1):
        return data.copy()
    valid = _windows(np.ones((1, *data.shape[1:]), dtype=bool), factor, phase, False)
    if method == "mean":
        sums = _windows(data.astype(np.result_type(data.dtype, np.float32)), factor, phase, 0).sum(axis=-1)
        mean = sums / valid.sum(axis=-1)
        return (np.rint(mean) if np.issubdtype(data.dtype, np.integer) else mean).astype(data.dtype)
    values = _windows(data, factor, phase, 0)
    counts = np.zeros(values.shape, dtype=np.int16)
    for j in range(values.shape[-1]):
        counts += (values == values[..., j : j + 1]) & valid[..., j : j + 1]
    counts[~np.broadcast_to(valid, counts.shape)] = -1
    pick = np.argmax(counts, axis=-1)
    return np.take_along_axis(values, pick[..., None], axis=-1)[..., 0]


@dataclass(frozen=True)
class DownsampleBlock:
    """Per-block task: read the window of level `level - 1` under a block of `level`, reduce it, write it."""

    url: str
    level: Level
    method: Method

    def __call__(self, block: Block) -> None:
        source = open_volume(self.url, scale=self.level.index - 1)
        target = open_volume(self.url, mode="r+", scale=self.level.index)
        write, factor = block.write_roi, self.level.factor
        windows = Roi(
            [b * f - p for b, f, p in zip(write.begin, factor, self.level.phase, strict=True)],
            [s * f for s, f in zip(write.shape, factor, strict=True)],
        )
        read = windows.intersect(source.meta.roi)
        phase = tuple(r - w for r, w in zip(read.begin, windows.begin, strict=True))
        target.write(write, downsample(source.read(read), factor, self.method, phase))


def _precomputed_scales(info: dict[str, Any], meta: VolumeMeta, levels: list[Level]) -> list[dict[str, Any]]:
    base = info["scales"][0]
    scales = [base]
    for level in levels:
        res = [r * f for r, f in zip(base["resolution"], level.total_factor[::-1], strict=True)]
        scale = {
            **{k: v for k, v in base.items() if k in ("encoding", "compressed_segmentation_block_size")},
            "key": "_".join(f"{r:g}" for r in res),
            "resolution": res,
            "voxel_offset": list(level.voxel_offset[::-1]),
            "size": list(level.shape[::-1]),
            "chunk_sizes": [list(meta.chunks[::-1])],
        }
        if level.shards is not None:
            scale["sharding"] = sharding_spec(meta.derive(shape=level.shape, shards=level.shards))
        scales.append(scale)
    return scales


def _prepare_precomputed(volume: PrecomputedVolume, levels: list[Level]) -> None:
    """Replace the layer's scales above 0 by `levels` in its `info`."""
    info = dict(volume.cv.info)
    info["scales"] = _precomputed_scales(info, volume.meta, levels)
    volume.cv.info = info
    volume.cv.commit_info()


def _prepare_zarr(volume: ZarrVolume, levels: list[Level]) -> None:
    """Create arrays s1.. in the OME-Zarr group and rewrite its `multiscales` metadata."""
    import zarr

    group = volume.node
    if not isinstance(group, zarr.Group) or "c" not in volume.axes:
        raise StorageError(
            f"{volume.url} is not an OME-Zarr group with axes c, z, y, x; a pyramid is added to the groups that "
            "mitoseg writes (create_volume makes one)"
        )
    meta = volume.meta
    base = volume.array
    fmt = base.metadata.zarr_format
    for level in levels:
        kwargs: dict[str, Any] = {"dimension_names": list(volume.axes)} if fmt == 3 else {}
        shape = {"c": meta.num_channels, **dict(zip(("z", "y", "x"), level.shape, strict=True))}
        chunks = {"c": meta.num_channels, **dict(zip(("z", "y", "x"), meta.chunks, strict=True))}
        if level.shards is not None:
            shards = {"c": meta.num_channels, **dict(zip(("z", "y", "x"), level.shards, strict=True))}
            kwargs["shards"] = tuple(shards[a] for a in volume.axes)
        group.create_array(
            f"s{level.index}",
            shape=tuple(shape[a] for a in volume.axes),
            chunks=tuple(chunks[a] for a in volume.axes),
            dtype=meta.dtype,
            fill_value=0,
            overwrite=True,
            **kwargs,
        )
    ome = ome_multiscales_attrs(meta, [(1, 1, 1)] + [level.total_factor for level in levels], fmt)
    group.attrs.update(ome)


def _level_plan(level: Level, chunks: Vec3, block_shape: Vec3 | None) -> BlockPlan:
    """Blocks of a level: `block_shape` (whole chunks) or about `DEFAULT_BLOCK_VOXELS`; whole shards of a sharded
    level, so that each shard has one writer."""
    if level.shards is None:
        return plan_blocks(level.shape, chunks, block_shape or whole_chunks(DEFAULT_BLOCK_VOXELS, chunks))
    block = whole_chunks(block_shape or DEFAULT_BLOCK_VOXELS, level.shards)
    return plan_blocks(level.shape, chunks, block, shard_shape=level.shards)


def add_pyramid(
    client: Any,
    url: str,
    *,
    min_chunks_across: int = 2,
    max_levels: int = 8,
    block_shape: Vec3 | None = None,
    max_in_flight: int | None = None,
    progress: bool = True,
    key: str | None = None,
) -> PyramidResult:
    """Add down-sampled levels to the volume at `url` (precomputed layer or OME-Zarr group), on Dask.

    Existing levels above 0 are replaced. Labels (`layer_type` segmentation) are reduced by mode, everything
    else by mean. `block_shape` (z, y, x voxels of a level) must be whole chunks; by default about
    64 x 128 x 128. A sharded volume gets sharded levels, and its blocks are rounded to whole shards of each
    level. Returns the levels and the run of each; a level with failed blocks ends the pyramid.
    `key` (the job that wrote level 0) is recorded when every level is written (see `pyramid_is_current`).
    """
    fs, record = _record_path(url)
    with suppress(FileNotFoundError):  # the levels are about to change: not current until every one is written
        fs.rm_file(record)
    volume = open_volume(url, mode="r+")
    meta = volume.meta
    parsed = parse_volume_url(url)
    # precomputed scales sit on the absolute voxel grid; OME-Zarr levels start where level 0 starts
    grid_offset = meta.voxel_offset if parsed.kind == "precomputed" else (0, 0, 0)
    levels = pyramid_levels(
        meta.shape, meta.chunks, meta.voxel_size_nm, min_chunks_across, max_levels, grid_offset, meta.shards
    )
    result = PyramidResult(str(parsed))
    if not levels:
        log.info("%s is already within %d chunks across; no pyramid needed", url, min_chunks_across)
        if key is not None:
            _record(url, key, 0)
        return result
    if isinstance(volume, PrecomputedVolume):
        _prepare_precomputed(volume, levels)
    elif isinstance(volume, ZarrVolume):
        _prepare_zarr(volume, levels)
    method: Method = "mode" if meta.layer_type == "segmentation" else "mean"
    for level in levels:
        plan = _level_plan(level, meta.chunks, block_shape)
        run = run_blockwise(
            client,
            plan,
            DownsampleBlock(str(parsed), level, method),
            max_in_flight=max_in_flight,
            description=f"pyramid s{level.index}",
            progress=progress,
        )
        result.levels.append(level)
        result.runs.append(run)
        if not run.ok:
            log.error("level s%d of %s: %d block(s) failed; coarser levels not written", level.index, url, run.failed)
            break
    if result.ok and key is not None:
        _record(url, key, len(result.levels))
    return result
