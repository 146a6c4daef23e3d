"""Orchestration of the instance stage on Dask: decode, match, merge on the client, relabel.

Pass 1 decodes every block into provisional IDs (a scratch zarr beside the output) and stores per-object
statistics, split into the objects that touch a face between blocks and the others; pass 2 finds the provisional
IDs that continue across block faces; the client merges the border objects with union-find and numbers the final
objects 1..N by arithmetic over per-block counts (`pipeline.instances.merge`); pass 3 writes the final IDs block
by block, each block given the final IDs of its own border objects only. The object table is written block by
block from the stored statistics. So the client holds the border objects, never all objects. Passes 1 and 3
write whole chunks of their own block only; every pass is resumable through done-records.

Watershed adds a fix-up step between match and merge (see `pipeline.instances.fixup`): a foreground component
that crosses block borders and holds several seed components is decoded again as a whole over its bounding
box, one Dask task per component, and its objects replace the per-block pieces.

What equals decoding the whole region as one block (up to renumbering of IDs), for every block size and
connectivity: components (mask only) always; watershed always too, provided the bounding box of every
foreground component that crosses block borders with several seeds fits in a worker's memory (mitochondria are
small). Small-object removal, the numbering 1..N and the measurements follow.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from daisy import Roi

from pipeline.config.instances import DecodeConfig, InstancesConfig
from pipeline.errors import ConfigError, GeometryError, StorageError
from pipeline.execution import BlockFailure, RunResult, error_text, run_blockwise
from pipeline.geometry import Vec3, check_ownership, parse_roi, roi_key, whole_chunks
from pipeline.instances.fixup import Fixup, plan_fixups
from pipeline.instances.ids import block_base, block_of, check_id_space, id_stride
from pipeline.instances.measure import ObjectStats, TableWriter
from pipeline.instances.merge import BorderObjects, Merged, interior_finals, merge_objects
from pipeline.instances.tasks import BlockFiles, DecodeTask, FixupTask, MatchTask, RelabelTask, StageSpec
from pipeline.plan import BlockPlan, plan_blocks
from pipeline.resume import OUTPUT_FORMAT, DoneMarkers, job_key, state_location
from pipeline.storage import configure, filesystem, redact
from pipeline.versions import job_location, show_written
from pipeline.viewing.meshes import MeshResult, add_meshes
from pipeline.viewing.pyramid import PyramidResult, add_pyramid
from pipeline.volumes import (
    Volume,
    VolumeMeta,
    VolumeURL,
    check_layout,
    create_volume,
    open_volume,
    parse_volume_url,
    resolve_version,
)

log = logging.getLogger(__name__)

DEFAULT_BLOCK = (64, 256, 256)
FILES_PER_BATCH = 256
"""Per-block files the client reads or writes at once: memory stays flat however many blocks there are."""


@dataclass
class InstancesResult:
    """What an instance run did: the three blockwise passes, the merge, and the objects found."""

    output: str
    decode: RunResult
    """Pass 1; a run that stops early leaves the later passes as None."""
    match: RunResult | None = None
    relabel: RunResult | None = None
    num_objects: int = 0
    equivalences: int = 0
    border_ids: int = 0
    border_objects: int = 0
    """Provisional objects that touch a face between blocks: all the merge holds (the others stay with their block)."""
    fixups: int = 0
    """Watershed: foreground components that crossed block borders with several seeds, decoded as a whole."""
    table: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    fixup_failures: list[BlockFailure] = field(default_factory=list)
    """Fix-ups that failed after their retries; the run stops before relabelling (decode and match stay done)."""
    pyramid: PyramidResult | None = None
    meshes: MeshResult | None = None
    """The viewing stages (`viewing: true`), after relabelling; their failures count like any other."""
    lease_failures: list[BlockFailure] = field(default_factory=list)
    """The output's lease, when another run took it over during this one."""

    @property
    def passes(self) -> list[RunResult]:
        return [r for r in (self.decode, self.match, self.relabel) if r is not None]

    @property
    def ok(self) -> bool:
        return self.relabel is not None and not self.failures

    @property
    def failures(self) -> list[BlockFailure]:
        found = [f for r in self.passes for f in r.failures] + self.fixup_failures + self.lease_failures
        if self.pyramid is not None:
            found += self.pyramid.failures
        if self.meshes is not None and self.meshes.run is not None:
            found += [replace(f, unit=f"{self.output} mesh block") for f in self.meshes.run.failures]
        return found


def resolve_decode(cfg: DecodeConfig, source: Volume) -> DecodeConfig:
    """Pick the method from the channel count and the threshold from the input's provenance; check the input."""
    meta = source.meta
    if meta.layer_type == "segmentation":
        raise ConfigError(f"input {source.url} is a segmentation layer; instances needs a probability volume")
    if meta.dtype != np.uint8 and not np.issubdtype(meta.dtype, np.floating):
        raise ConfigError(
            f"input {source.url} holds {meta.dtype}; probabilities must be uint8 (probability x 255) or float"
        )
    channels = meta.num_channels
    if channels not in (1, 2):
        raise ConfigError(f"input {source.url} has {channels} channels; instances needs 1 (mask) or 2 (mask, contour)")
    method = cfg.method
    if method == "auto":
        method = "watershed" if channels == 2 else "components"
    if method == "watershed" and channels != 2:
        raise ConfigError(
            f"decode.method 'watershed' needs mask and contour channels, but {source.url} has {channels}; "
            "use method 'components' or a two-channel probability volume"
        )
    threshold = cfg.threshold
    if threshold is None and method == "components":
        threshold = float(source.provenance.get("threshold", 0.5))
    return cfg.model_copy(update={"method": method, "threshold": threshold})


def label_meta(meta: VolumeMeta, dtype: str, shards: Vec3 | None = None) -> VolumeMeta:
    """The metadata of a label volume over the input: one channel, same geometry, segmentation layer, `shards`."""
    return meta.derive(dtype=np.dtype(dtype), num_channels=1, layer_type="segmentation", shards=shards)


def block_shape_for(config: InstancesConfig, chunks: Vec3) -> Vec3:
    """The configured block, or the whole-chunk (whole-shard, with `shard_size`) block nearest `DEFAULT_BLOCK`."""
    if config.block_size is not None:
        return config.block_size
    return whole_chunks(DEFAULT_BLOCK, config.shard_size or chunks)


def _existing(url: str, meta: VolumeMeta) -> Volume | None:
    """An existing volume at `url` of the geometry and type of `meta`; None when there is none.

    An existing volume of another shape or type is refused: resuming into it would mix two jobs.
    """
    try:
        existing = open_volume(url, mode="r+")
    except StorageError:
        return None
    got = existing.meta
    if (got.shape, got.dtype, got.num_channels) != (meta.shape, meta.dtype, meta.num_channels):
        raise GeometryError(
            f"{url} exists with shape {got.shape}, {got.num_channels} channel(s) of {got.dtype}, but this job "
            f"writes shape {meta.shape}, {meta.num_channels} channel of {meta.dtype}; choose another output or run "
            "with resume switched off (--no-resume) to replace it"
        )
    return existing


def _open_or_create(url: str, meta: VolumeMeta, reuse: bool) -> tuple[Volume, bool]:
    """Reuse a compatible existing volume when `reuse`, else create it; say whether it was reused."""
    existing = _existing(url, meta) if reuse else None
    if existing is not None:
        return existing, True
    return create_volume(url, meta), False


def _run_pass(
    client: Any, plan: BlockPlan, task: Any, done: DoneMarkers, resume: bool, description: str, progress: bool
) -> RunResult:
    if not resume:
        done.clear()
    return run_blockwise(client, plan, task, done=done, description=description, progress=progress)


def _batches(plan: BlockPlan) -> Iterator[list[int]]:
    """The plan's block ids in order, `FILES_PER_BATCH` at a time."""
    for start in range(0, plan.num_blocks, FILES_PER_BATCH):
        yield list(range(start, min(start + FILES_PER_BATCH, plan.num_blocks)))


@dataclass
class PassFiles:
    """What the decode and match passes stored for the merge, in block order: border objects and face pairs."""

    border: BorderObjects
    links: np.ndarray
    touches: np.ndarray
    contacts: np.ndarray


def _load_pass_files(files: BlockFiles, plan: BlockPlan) -> PassFiles:
    """The border objects and face pairs of every block, read a batch of blocks at a time."""
    widths = {"links": 2, "touches": 2, "contacts": 4}
    border, pairs = [], {name: [np.zeros((0, w), np.uint64)] for name, w in widths.items()}
    for ids in _batches(plan):
        stored = files.get_many([f"border/{b}.npz" for b in ids])
        border.append(BorderObjects.concat([BorderObjects.from_arrays(a) for a in stored]))
        matches = files.get_many([f"match/{b}.npz" for b in ids])
        for name, found in pairs.items():
            found += [m[name] for m in matches if len(m[name])]
    return PassFiles(BorderObjects.concat(border), *(np.concatenate(found) for found in pairs.values()))


@dataclass(frozen=True)
class InstancesJob:
    """A checked job: the input's geometry, the resolved decoding, the block plan and where state lives."""

    config: InstancesConfig
    meta: VolumeMeta
    input_url: str
    output_url: str
    decode: DecodeConfig
    region: Roi
    block_shape: Vec3
    plan: BlockPlan
    key: str
    state: str
    """Location of the job's scratch labels and per-block files (beside the output)."""
    named_output: str = ""
    """The output as the job names it: `output_url` is the version of it this job writes (`pipeline.versions`)."""

    def record(self) -> dict[str, Any]:
        """What defines the job's labels, for keys and provenance."""
        return {
            "input": redact(self.input_url),
            "roi": roi_key(self.region),
            "block": list(self.block_shape),
            "decode": self.decode.model_dump(),
        }


def prepare_instances(config: InstancesConfig) -> InstancesJob:
    """Check a job without starting any work: input channels and type, method, region, block plan, ID space."""
    if not config.input or not config.output:
        raise ConfigError("instances needs an input and an output: set them in the job file or pass --input/--output")
    configure(config.storage.s3_endpoint_url)  # before any volume opens, and before local workers start
    source = open_volume(config.input)
    source.require_complete("decoding instances from it")
    decode = resolve_decode(config.decode, source)
    meta = source.meta
    region = parse_roi(config.roi) if config.roi else meta.roi
    block_shape = block_shape_for(config, meta.chunks)
    shards = config.shard_size
    if shards is not None:  # refused before any work: the output is created only after decode, match and merge
        check_ownership(shards, meta.chunks, "output chunks (the input's chunks)", "shard_size")
        check_ownership(block_shape, shards, "output shards (shard_size)", "block_size")
        check_layout(config.output, label_meta(meta, config.dtype, shards))
    plan = plan_blocks(meta.shape, meta.chunks, block_shape, roi=region, shard_shape=shards)
    check_id_space(plan.num_blocks, id_stride(block_shape))
    output = parse_volume_url(config.output)
    job = InstancesJob(config, meta, str(source.url), str(output), decode, region, block_shape, plan, "", "")
    # the input's content id changes whenever segment rewrites any of its blocks: new probabilities, new labels
    content = source.provenance.get("content_id")
    key = job_key(
        stage="instances",
        format=OUTPUT_FORMAT,  # a new per-block file layout or numbering reuses no state of an older mitoseg
        chunks=meta.chunks,
        input_content=content,
        dtype=config.dtype,
        meshes=config.mesh_format if config.viewing else None,  # another mesh format is another output
        **job.record(),
    )
    target = _version_for(output, key, label_meta(meta, config.dtype)) if config.resume else output
    state = f"{state_location(target.location)}/instances/{key}"
    return replace(job, output_url=str(target), key=key, state=state, named_output=str(output))


def _version_for(output: VolumeURL, key: str, meta: VolumeMeta) -> VolumeURL:
    """The version of `output` job `key` writes: the current one when it is this job's (or there is none yet),
    an earlier version of this job, or a new version beside the others; never another job's labels in place."""
    current = resolve_version(output)
    existing = _existing(str(current), meta)
    if existing is None or existing.provenance.get("job_key") == key:
        return current
    location = job_location(str(output), key)
    log.info("instances: %s holds another job's labels; this job writes version %s beside them", output, key)
    return replace(output, location=location)


def run_instances(
    config: InstancesConfig | InstancesJob, client: Any, progress: bool = True, force: bool = False
) -> InstancesResult:
    """Decode the input into globally consistent instance IDs in the output, with an object table.

    The run holds the output's lease throughout (`pipeline.lease`); `force` breaks another run's."""
    from pipeline.lease import Lease

    job = config if isinstance(config, InstancesJob) else prepare_instances(config)
    with Lease(parse_volume_url(job.named_output or job.output_url).location, force=force) as lease:
        result = _run_instances(job, client, progress)
    lost = lease.failure()
    if lost is not None:
        result.lease_failures.append(lost)
    return result


def _unchanged(job: InstancesJob) -> InstancesResult | None:
    """The result of an unchanged re-run, when the output is complete for this very job (same key, same input
    content) and its table exists: nothing to decode, match, relabel, mesh or tabulate again."""
    if not job.config.resume:
        return None
    existing = _existing(job.output_url, label_meta(job.meta, job.config.dtype))
    if (
        existing is None
        or existing.provenance.get("job_key") != job.key
        or existing.provenance.get("complete") is not True
    ):
        return None
    table = job.config.table
    if table:
        fs, path = filesystem(table)
        if not fs.exists(path):
            return None
    total = job.plan.num_blocks
    decode, match, relabel = (RunResult(total=total, unchanged=total) for _ in range(3))
    log.info("instances: nothing changed since %s was written (same job, same input): no stage ran", job.output_url)
    objects = int(existing.provenance.get("objects", 0))
    return InstancesResult(job.output_url, decode, match, relabel, num_objects=objects, table=table or None)


def _run_instances(job: InstancesJob, client: Any, progress: bool) -> InstancesResult:
    unchanged = _unchanged(job)
    if unchanged is not None:
        return unchanged
    cfg, plan, meta, state = job.config, job.plan, job.meta, job.state
    output_location = parse_volume_url(job.output_url).location
    scratch_url = f"zarr://{state}/provisional"
    _, scratch_reused = _open_or_create(scratch_url, label_meta(meta, "uint64"), cfg.resume)
    resume = cfg.resume and scratch_reused
    stride = id_stride(job.block_shape)
    spec = StageSpec(job.input_url, scratch_url, f"{state}/blocks", job.region, stride, job.decode, uuid.uuid4().hex)
    markers = {
        name: DoneMarkers(output_location, job_key(job=job.key, stage=name, output=job.output_url, dtype=cfg.dtype))
        for name in ("decode", "match", "relabel")
    }
    log.info("instances: %d blocks of %s voxels, method %s", plan.num_blocks, job.block_shape, job.decode.method)

    result = InstancesResult(job.output_url, RunResult(total=plan.num_blocks))
    clock = time.perf_counter()
    result.decode = _run_pass(client, plan, DecodeTask(spec), markers["decode"], resume, "decode", progress)
    result.seconds["decode"] = time.perf_counter() - clock
    if not result.decode.ok:
        return result
    clock = time.perf_counter()
    result.match = _run_pass(client, plan, MatchTask(spec), markers["match"], resume, "match", progress)
    result.seconds["match"] = time.perf_counter() - clock
    if not result.match.ok:
        return result

    clock = time.perf_counter()
    merged = _merge(client, spec, plan, cfg.dtype, result, resume)
    if merged is None:  # a fix-up failed: listed in the result, nothing relabelled
        return result
    result.seconds["merge"] = time.perf_counter() - clock - result.seconds.get("fixup", 0.0)
    result.num_objects, result.equivalences = merged.num_objects, merged.equivalences
    result.border_ids = merged.border_ids

    clock = time.perf_counter()
    target, reused = _open_or_create(job.output_url, label_meta(meta, cfg.dtype, cfg.shard_size), resume)
    # from the first label written until the last stage ends, the output is this job's and incomplete
    target.set_provenance({**target.provenance, "job_key": job.key, "complete": False})
    task = RelabelTask(spec, job.output_url, cfg.dtype)
    result.relabel = _run_pass(client, plan, task, markers["relabel"], resume and reused, "relabel", progress)
    result.seconds["relabel"] = time.perf_counter() - clock
    if not result.relabel.ok:
        return result

    labelled = {"stage": "instances", **job.record(), "objects": result.num_objects}
    target.set_provenance({**labelled, "job_key": job.key, "complete": False})
    if cfg.table:
        _write_table(BlockFiles(spec.files), plan, merged, cfg.table, meta)
        result.table = cfg.table
    if cfg.viewing:
        result.pyramid = add_pyramid(client, job.output_url, progress=progress)
        result.meshes = add_meshes(client, job.output_url, mesh_format=cfg.mesh_format, progress=progress)
    if result.ok:  # every stage finished: an unchanged re-run of this job does nothing (`_unchanged`)
        final = open_volume(job.output_url, mode="r+")  # afresh: the viewing stages added scales to its metadata
        final.set_provenance({**final.provenance, "complete": True})
        _show_version(job)
    if not cfg.keep_scratch and result.ok:  # after a failed viewing stage a re-run reuses decode, match, relabel
        _remove_state(state, list(markers.values()))
    return result


def _show_version(job: InstancesJob) -> None:
    """Switch the output the job names to the version it completed, when that is not current already."""
    named = parse_volume_url(job.named_output or job.output_url).location
    name = show_written(named, parse_volume_url(job.output_url).location)
    if name is not None:
        log.info("instances: %s now shows version %s (mitoseg versions list)", job.named_output, name)


def _merge(
    client: Any, spec: StageSpec, plan: BlockPlan, dtype: str, result: InstancesResult, resume: bool
) -> Merged | None:
    """Fix-ups on Dask, union-find of the border objects on the client, final numbering, and a map per block.

    None when a fix-up failed (listed in `result.fixup_failures`)."""
    files, decode = BlockFiles(spec.files), spec.decode
    loaded = _load_pass_files(files, plan)
    border = loaded.border
    result.border_objects = len(border.stats)
    fixups: list[Fixup] = []
    fixed = None
    if decode.method == "watershed":
        fixups, fixed = plan_fixups(border.stats, border.components, loaded.links, loaded.touches, spec.stride)
    clock = time.perf_counter()
    extra, result.fixup_failures = _run_fixups(client, spec, fixups, resume)
    result.seconds["fixup"] = time.perf_counter() - clock
    result.fixups = len(fixups)
    if result.fixup_failures:
        return None
    merged = merge_objects(
        border,
        loaded.links,
        loaded.touches,
        loaded.contacts,
        decode.min_size,
        spec.stride,
        fixed,
        ObjectStats.concat(extra),
    )
    if merged.num_objects > np.iinfo(np.dtype(dtype)).max:
        raise ConfigError(f"{merged.num_objects} objects do not fit {dtype} labels; use dtype uint64")
    _write_maps(files, plan, spec.stride, border.stats.ids, merged, fixups, _fixup_tables(extra, merged.extra_final))
    return merged


def _write_maps(
    files: BlockFiles,
    plan: BlockPlan,
    stride: int,
    border_ids: np.ndarray,
    merged: Merged,
    fixups: list[Fixup],
    fixup_tables: list[np.ndarray],
) -> None:
    """One small map per block for relabelling: the final IDs of its border objects, the range of final IDs
    rooted in it, and the fix-ups that meet it with their final IDs."""
    row_block = block_of(border_ids, stride)
    boxes = np.array([[*f.begin, *f.end] for f in fixups], dtype=np.int64).reshape(-1, 6)
    maps: dict[str, dict[str, np.ndarray]] = {}
    for block in plan.blocks():
        block_id = block.block_id[1]
        begin, end = np.array(block.write_roi.begin), np.array(block.write_roi.end)
        meets = np.flatnonzero(np.all(boxes[:, :3] < end, axis=1) & np.all(boxes[:, 3:] > begin, axis=1))
        rows = slice(*np.searchsorted(row_block, [block_id, block_id + 1]).tolist())
        chosen = [fixup_tables[i] for i in meets.tolist()]
        maps[f"map/{block_id}.npz"] = {
            "labels": (border_ids[rows] - np.uint64(block_base(block_id, stride))).astype(np.int64),
            "final": merged.row_final[rows],
            "first": np.array(merged.first[block_id]),
            "end": np.array(merged.first[block_id + 1]),
            "fixups": np.array([fixups[i].key for i in meets.tolist()], dtype=np.uint64),
            "fixup_offsets": np.cumsum([0] + [len(t) for t in chosen]).astype(np.int64),
            "fixup_final": np.concatenate([np.zeros(0, np.uint64), *chosen]),
        }
        if len(maps) == FILES_PER_BATCH:
            files.put_many(maps)
            maps = {}
    if maps:
        files.put_many(maps)


def _write_table(files: BlockFiles, plan: BlockPlan, merged: Merged, path: str, meta: VolumeMeta) -> None:
    """The object table in ID order, block by block: each block's kept interior objects from its files with the
    merged objects rooted in it, then the fix-up objects; only a batch of blocks is read at a time."""
    with TableWriter(path, meta.voxel_size_nm, meta.voxel_offset) as table:
        first, finals = merged.first, merged.final_ids
        for ids in _batches(plan):
            for block_id, stored in zip(ids, files.get_many([f"interior/{b}.npz" for b in ids]), strict=True):
                inner = ObjectStats.from_arrays(stored)
                begin, end = int(first[block_id]), int(first[block_id + 1])
                own = slice(*np.searchsorted(finals, [begin + 1, end + 1]).tolist())
                inner_finals = interior_finals(begin, end, finals[own], len(inner))
                table.add(
                    ObjectStats.concat([inner, merged.objects.select(own)]), np.concatenate([inner_finals, finals[own]])
                )
        extra = slice(int(np.searchsorted(finals, int(first[-1]) + 1)), len(finals))
        table.add(merged.objects.select(extra), finals[extra])


def _run_fixups(
    client: Any, spec: StageSpec, fixups: list[Fixup], resume: bool
) -> tuple[list[ObjectStats], list[BlockFailure]]:
    """Decode every listed component as a whole on the Dask cluster (`resume`: reuse what an earlier run of the
    job stored): their objects' statistics in order, and the fix-ups that failed after their retries."""
    futures = client.map(FixupTask(spec, reuse=resume), fixups, pure=False, retries=2)
    stats, failures = [], []
    for fixup, future in zip(fixups, futures, strict=True):
        try:
            stats.append(ObjectStats.from_arrays(future.result()))
        except Exception as error:  # any task error is reported; the other fix-ups still finish
            text = error_text(error)
            log.error("fix-up of foreground component %d (box %s) failed: %s", fixup.key, roi_key(fixup.roi), text)
            failures.append(BlockFailure(fixup.key, roi_key(fixup.roi), text, unit="fix-up of foreground component"))
    return stats, failures


def _fixup_tables(extra: list[ObjectStats], extra_final: np.ndarray | None) -> list[np.ndarray]:
    """Per fixed component, the final ID of each of its local labels (index 0 = background)."""
    tables, start = [], 0
    for stats in extra:
        assert extra_final is not None
        tables.append(np.concatenate([np.zeros(1, np.uint64), extra_final[start : start + len(stats)]]))
        start += len(stats)
    return tables


def _remove_state(state: str, markers: list[DoneMarkers]) -> None:
    """Delete the scratch labels, per-block files and done-records of a finished job."""
    for marker in markers:
        marker.clear()
    if state.startswith("file://"):
        shutil.rmtree(state[len("file://") :], ignore_errors=True)
        return
    from cloudfiles import CloudFiles

    files = CloudFiles(state, progress=False)
    files.delete(list(files.list()))
