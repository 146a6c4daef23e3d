"""Orchestration of `segment`: check the job, prepare outputs and plan, run the blocks on Dask, summarise.

Runs on the client. The per-block work lives in `workers.predict_block`; the network is loaded once per
worker by `workers.plugin.ModelPlugin`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config.instances import InstancesConfig
from pipeline.config.segment import SegmentConfig
from pipeline.errors import ConfigError, StorageError
from pipeline.execution import BlockFailure, RunResult, run_blockwise
from pipeline.geometry import Vec3, as_zyx, check_ownership, parse_roi, roi_key
from pipeline.network.inputs import InputChecks, check_voxel_size
from pipeline.plan import BlockPlan, common_shard, plan_blocks
from pipeline.resume import OUTPUT_FORMAT, BlockRecords, job_key, new_output_id, segment_records, state_location
from pipeline.stitching import PatchGrid
from pipeline.storage import configure, filesystem, redact
from pipeline.versions import job_location, show_written, unpoint
from pipeline.volumes import Volume, VolumeMeta, create_volume, open_volume, parse_volume_url, resolve_version

log = logging.getLogger(__name__)

INPUT_DTYPES = ("uint8", "uint16", "float16", "float32")


@dataclass(frozen=True)
class NetworkInfo:
    """What the client needs to know about the network to plan a run (no weights)."""

    content_hash: str
    out_channels: int
    context: tuple[int, int, int]
    patch_shape: tuple[int, int, int]
    size_divisor: tuple[int, int, int]
    threshold: float
    median_size: int
    margin: tuple[int, int, int]
    """Voxels the checkpoint recommends cutting from each side of a patch's prediction (at least `context`)."""
    overlap: tuple[float, float, float]


@dataclass
class SegmentRun:
    """A checked, planned job ready to submit."""

    config: SegmentConfig
    plan: BlockPlan
    job: Any  # workers.predict_block.PredictJob
    done: BlockRecords | None
    outputs: list[str]
    """The exact volumes this run writes (a version of each output the job names)."""
    checkpoint_hash: str = ""
    named: list[str] = field(default_factory=list)
    """The outputs as the job names them; each shows the version this run wrote once it is complete."""


@dataclass
class SegmentResult:
    """The outcome of a segment run: block counts and failures, and where the outputs are."""

    run: RunResult
    outputs: list[str]
    job_key: str
    extra: dict[str, Any] = field(default_factory=dict)
    """`pyramids` ({output: PyramidResult}) and `instances` (InstancesResult) when those stages ran;
    `lease_failures`: outputs whose lease another run took over during this one."""

    @property
    def failures(self) -> list[BlockFailure]:
        """What failed in every stage: segment blocks, each output's pyramid, and the instances that follow."""
        found = list(self.run.failures) + self.extra.get("lease_failures", [])
        for pyramid in self.extra.get("pyramids", {}).values():
            found += pyramid.failures
        if "instances" in self.extra:
            found += self.extra["instances"].failures
        return found


def network_info(checkpoint: str) -> NetworkInfo:
    """Read the network's shape facts from a checkpoint."""
    from pipeline.network.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint, device="cpu")
    return NetworkInfo(
        content_hash=loaded.content_hash,
        out_channels=int(loaded.network_config.out_channels),
        context=loaded.network.context,
        patch_shape=as_zyx(loaded.patch_shape, "checkpoint patch_shape"),
        size_divisor=loaded.network.size_divisor,
        threshold=float(loaded.threshold),
        median_size=loaded.median_size,
        margin=loaded.margin or loaded.network.context,
        overlap=loaded.overlap,
    )


def patch_grid(config: SegmentConfig, net: NetworkInfo, volume_shape: Vec3) -> PatchGrid:
    """The patch grid a job runs over `volume_shape`: its patch shape, margin and overlap, else the checkpoint's."""
    patch = tuple(config.patch_shape or net.patch_shape)
    bad = [p for p, d in zip(patch, net.size_divisor, strict=True) if p % d]
    if bad:
        raise ConfigError(f"patch_shape {patch} must be divisible by the network's size divisor {net.size_divisor}")
    margin = tuple(config.margin or net.margin)
    if any(m < c for m, c in zip(margin, net.context, strict=True)):
        raise ConfigError(
            f"margin {list(margin)} is less than the network's context {list(net.context)}: the network's output "
            "there is not valid; use a margin of at least the context"
        )
    overlap = net.overlap if config.overlap is None else config.overlap
    return PatchGrid.with_overlap(patch, margin, overlap, volume_shape)  # type: ignore[arg-type]


def check_input(source: Volume) -> None:
    """Refuse inputs the network cannot read."""
    if source.meta.dtype.name not in INPUT_DTYPES:
        raise StorageError(
            f"input {source.url} holds {source.meta.dtype.name} voxels; "
            f"supported input types: {', '.join(INPUT_DTYPES)}"
        )
    if source.meta.num_channels != 1:
        raise StorageError(f"input {source.url} has {source.meta.num_channels} channels; the network needs one")


def _something_at(location: str) -> bool:
    """Whether anything (a file, or a folder that is not empty) is stored at `location`."""
    fs, path = filesystem(location)
    try:
        return bool(fs.exists(path) and (fs.isfile(path) or fs.ls(path, detail=False)))
    except Exception as err:
        raise StorageError(f"cannot check whether {location} exists: {err}") from err


def _delete(location: str) -> None:
    """Remove what is stored at `location` (only on an explicit overwrite)."""
    fs, path = filesystem(location)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as err:
        raise StorageError(f"cannot delete {location} to overwrite it: {err}; delete it by hand") from err


def _prepare_output(url: str, meta: VolumeMeta, overwrite: bool, check: bool = True) -> tuple[Volume, str]:
    """Open a compatible existing output, or create one; return it with its identity (its `output_id`).

    Nothing is deleted unless `overwrite`: an output that exists but cannot be opened is an error naming it.
    An existing output without an identity (written by something else) gets a new one, so no record applies.
    """
    location = parse_volume_url(url).location
    if overwrite:
        _delete(location)
        _delete(f"{state_location(location)}/segment")
        log.info("overwrite: deleted %s and its done-records", url)
    elif _something_at(location):
        try:
            existing = open_volume(url, mode="r+")
        except StorageError as err:
            raise StorageError(
                f"output {url} exists but cannot be opened: {err}; nothing was changed. Repair or remove it, choose "
                "another output, or run with --overwrite to delete and re-create it"
            ) from err
        if check:
            _check_layout(existing, meta)
        return existing, str(existing.provenance.get("output_id") or new_output_id())
    return create_volume(url, meta), new_output_id()


def _check_layout(existing: Volume, meta: VolumeMeta) -> None:
    """Refuse to go on writing into an existing output whose shape, channels or type differ from this job's."""
    found = (existing.meta.shape, existing.meta.num_channels, existing.meta.dtype)
    wanted = (meta.shape, meta.num_channels, meta.dtype)
    if found != wanted:
        raise StorageError(
            f"output {existing.url} exists with shape/channels/dtype {found}, but this job writes {wanted}; "
            "choose another output, or run with --overwrite to delete and re-create it"
        )


def prepare(config: SegmentConfig) -> SegmentRun:
    """Check everything that can be checked before any work, create outputs, and plan the blocks."""
    from pipeline.network.checkpoint import resolve_checkpoint
    from workers.plugin import plugin_name
    from workers.predict_block import PredictJob

    config = config.model_copy(update={"checkpoint": resolve_checkpoint(config.checkpoint)})  # a name -> its file
    source = open_volume(config.input, scale=config.input_scale)
    check_input(source)
    net = network_info(str(config.checkpoint))
    check_voxel_size(source, config.checkpoint, config.voxel_size_tolerance)
    grid = patch_grid(config, net, source.meta.shape)
    median = net.median_size if config.median_size is None else config.median_size
    roi = parse_roi(config.roi) if config.roi else source.meta.roi
    out_meta = source.meta.derive(
        dtype=np.dtype(config.output_dtype),
        num_channels=net.out_channels,
        chunks=tuple(min(c, b) for c, b in zip(config.chunk_size, config.block_size, strict=True)),
        layer_type="image",
        shards=config.shard_size,
    )
    if out_meta.shards is not None:  # refused before any output is created
        check_ownership(out_meta.shards, out_meta.chunks, "output chunks", "shard_size")
        check_ownership(config.block_size, out_meta.shards, "output shards (shard_size)", "block_size")
    outputs = [str(parse_volume_url(u)) for u in config.output]
    if str(parse_volume_url(config.input)) in outputs:
        raise ConfigError(f"output {config.input} is the input volume; choose a different output")
    if config.overwrite:
        for url in outputs:
            unpoint(parse_volume_url(url).location)  # the output location itself is current again
    current = [str(resolve_version(u)) for u in outputs]  # where each output's current version lives
    fresh = [not _something_at(parse_volume_url(u).location) for u in current]
    opened = [_prepare_output(u, out_meta, config.overwrite, check=False) for u in current]
    volumes = [volume for volume, _ in opened]
    output_ids = tuple(output_id for _, output_id in opened)
    chunks = volumes[0].meta.chunks
    if any(v.meta.chunks != chunks for v in volumes[1:]):
        raise StorageError(f"outputs {outputs} have different chunk shapes; each block must write whole chunks of all")
    margin = tuple(c + o for c, o in zip(grid.context, grid.output_shape, strict=True))
    shards = common_shard(chunks, (v.meta.write_unit for v in volumes))  # whole shards of every sharded output
    plan = plan_blocks(source.meta.shape, chunks, config.block_size, roi, context=margin, shard_shape=shards)
    job = PredictJob(
        input_url=str(source.url),
        output_urls=tuple(outputs),
        volume_shape=source.meta.shape,
        grid=grid,
        output_dtype=config.output_dtype,
        blending=config.blending,
        tta=config.tta,
        median_size=median,
        tile_trim=tuple(m - c for m, c in zip(grid.context, net.context, strict=True)),  # type: ignore[arg-type]
        input_scale=config.input_scale,
        input_checks=InputChecks(config.fill_missing, config.input_range),
        batch_size=config.batch_size,
    )
    key = segment_job_key(config, source, plan, job, net.content_hash)
    targets = [
        (volume, output_id) if new or config.overwrite else _version_for(url, key, volume, output_id, out_meta)
        for url, new, volume, output_id in zip(outputs, fresh, volumes, output_ids, strict=True)
    ]
    for volume, _ in targets:
        _check_layout(volume, out_meta)
    volumes = [volume for volume, _ in targets]
    output_ids = tuple(output_id for _, output_id in targets)
    job = dataclasses.replace(
        job,
        output_urls=tuple(str(v.url) for v in volumes),
        key=key,
        network=plugin_name(net.content_hash, config.device, config.precision),
        output_ids=output_ids,
    )
    done = segment_records(volumes[0].url.location, output_ids, key)
    record = {
        "job_key": key,
        "input": redact(str(source.url)),
        "checkpoint": str(config.checkpoint),
        "checkpoint_hash": net.content_hash,
        "threshold": net.threshold,
        "channels": ["mitochondrion", "contour"][: net.out_channels],
        "output_dtype": config.output_dtype,
        "tta": config.tta,
        "median_size": median,
        "roi": roi_key(roi),
        "complete": False,  # set when every block of the run is written (evaluate refuses a partial prediction)
    }
    for volume, output_id in zip(volumes, output_ids, strict=True):
        earlier = volume.provenance  # a version keeps when it was made and the id of what it holds
        volume.set_provenance(
            {
                **record,
                "output_id": output_id,
                "precision": config.precision,
                "created_at": earlier.get("created_at") or time.time(),
                "content_id": earlier.get("content_id"),
            }
        )
    return SegmentRun(config, plan, job, done, list(job.output_urls), net.content_hash, outputs)


def _show_written_versions(run: SegmentRun) -> None:
    """Switch each output the job names to the version this run completed, if it is not current already."""
    for named, written in zip(run.named, run.outputs, strict=True):
        name = show_written(parse_volume_url(named).location, parse_volume_url(written).location)
        if name is not None:
            log.info("output %s now shows version %s (earlier versions: mitoseg versions list)", redact(named), name)


def _version_for(url: str, key: str, current: Volume, current_id: str, meta: VolumeMeta) -> tuple[Volume, str]:
    """The version of output `url` that job `key` writes: the current one when it is this job's, an earlier
    version of this job (a return to an earlier network or setting), or a new version beside the others, with
    `meta`'s shape, channels and type in the current one's chunks and shards. A changed job never writes into
    another job's output (`pipeline.versions`)."""
    if current.provenance.get("job_key") == key:
        return current, current_id
    location = job_location(url, key)
    target = f"{str(current.url).split('://', 1)[0]}://{location}"
    if _something_at(location):  # this job's own earlier version: it goes on there
        log.info("output %s: version %s was written by this same job; going on there", redact(url), location)
        volume = open_volume(target, mode="r+")
        return volume, str(volume.provenance.get("output_id") or new_output_id())
    if current.meta.shape != meta.shape:  # other data, not a reprocessing of this output's
        _check_layout(current, meta)
    log.info(
        "output %s holds another job's result (%s): writing version %s beside it; the output switches to it when "
        "it is complete",
        redact(url),
        current.provenance.get("job_key", "not written by mitoseg segment"),
        key,
    )
    layout = meta.derive(chunks=current.meta.chunks, shards=current.meta.shards)
    return _prepare_output(target, layout, overwrite=False)


def segment_job_key(config: SegmentConfig, source: Volume, plan: BlockPlan, job: Any, network_hash: str) -> str:
    """The hash of everything that defines the bytes a segment job writes, and which block is which.

    Every field of the worker's job (input, outputs, patch grid, inference and output settings), the input's
    geometry and type, the network's content hash, device and precision settings, the plan, and
    `OUTPUT_FORMAT` (mitoseg's output version). URLs enter without credentials: a renewed signature or key is the
    same job.
    """
    meta = source.meta
    fields = dataclasses.asdict(job)
    fields["input_url"] = redact(fields["input_url"])
    fields["output_urls"] = [redact(u) for u in fields["output_urls"]]
    return job_key(
        format=OUTPUT_FORMAT,
        job=fields,
        input_meta=(meta.shape, meta.chunks, meta.dtype.str, meta.num_channels, meta.voxel_size_nm, meta.voxel_offset),
        scale=config.input_scale,
        roi=roi_key(plan.roi),
        block=plan.block_shape,
        chunks=plan.chunk_shape,
        context=plan.context,
        network=network_hash,
        device=config.device,
        precision=config.precision,
    )


def execute(run: SegmentRun, client: Any, plugin: Any = None, progress: bool = True) -> SegmentResult:
    """Load the network on every worker and run the planned blocks."""
    from pipeline.errors import ModelLoadError
    from workers.plugin import ModelPlugin
    from workers.predict_block import block_stages

    config = run.config
    plugin = plugin or ModelPlugin(
        config.checkpoint, device=config.device, precision=config.precision, content_hash=run.checkpoint_hash
    )
    if plugin.name != run.job.network:
        raise ModelLoadError(
            f"the worker plugin {plugin.name} does not run the network this job planned with ({run.job.network}); "
            "give a plugin for the job's checkpoint, device and precision"
        )
    client.register_plugin(plugin)  # named for its network: other jobs' networks on this cluster stay loaded
    result = run_blockwise(
        client,
        run.plan,
        block_stages(run.job),  # the next block is read and the last written while one computes
        done=run.done,
        check_on_worker=True,
        resume=config.resume,
        blocks_per_task=None,  # sized from the measured block time: cheap (e.g. unchanged) blocks travel together
        max_in_flight=config.max_in_flight,
        retries=config.retries,
        resources={"GPU": 1} if config.gpu_resource else None,
        description="segment",
        progress=progress,
    )
    return SegmentResult(result, run.outputs, run.done.key if run.done else "")


def _label_shards(follow: InstancesConfig, shards: Vec3 | None) -> Vec3 | None:
    """The shards of the labels that follow segment: the section's own; else, when it decodes segment's output,
    that output's shards, where the label output can hold them (not zarr v2) and the instances blocks, when set,
    are whole shards."""
    if follow.shard_size is not None or follow.input is not None:
        return follow.shard_size
    if shards is None or follow.output is None or parse_volume_url(follow.output).zarr_format == 2:
        return None
    block = follow.block_size
    if block is not None and any(b % s for b, s in zip(block, shards, strict=True)):
        return None
    return shards


def segment(
    config: SegmentConfig, client: Any = None, plugin: Any = None, progress: bool = True, force: bool = False
) -> SegmentResult:
    """Run a whole segment job: on `client` when given, else on the cluster the config names.

    The run holds the lease of every output throughout (`pipeline.lease`); `force` breaks another run's."""
    from pipeline.lease import hold_leases

    configure(config.storage.s3_endpoint_url)  # before any storage access (leases, volumes) and local workers
    with hold_leases([parse_volume_url(u).location for u in config.output], force=force) as leases:
        result = _segment(config, client, plugin, progress, force)
    result.extra["lease_failures"] = [f for f in (lease.failure() for lease in leases) if f is not None]
    return result


def _segment(config: SegmentConfig, client: Any, plugin: Any, progress: bool, force: bool) -> SegmentResult:
    from pipeline.cluster import dask_client

    run = prepare(config)
    log.info(
        "segmenting %s: %d blocks of %s over region %s, patches %s",
        config.input,
        run.plan.num_blocks,
        run.plan.block_shape,
        roi_key(run.plan.roi),
        run.job.grid.patch_shape,
    )
    if client is not None:
        return _execute_and_finish(run, client, plugin, progress, force)
    with dask_client(config.cluster, gpus=int(config.gpu_resource)) as own:
        return _execute_and_finish(run, own, plugin, progress, force)


def _execute_and_finish(run: SegmentRun, client: Any, plugin: Any, progress: bool, force: bool) -> SegmentResult:
    """Run the blocks, then add the viewing pyramid to each output when every block succeeded."""
    result = execute(run, client, plugin, progress)
    if result.run.ok and result.run.completed == 0:
        log.info("%s: nothing changed since the last run (same job, same input): no block was computed", run.outputs)
    if result.run.ok:
        for url in result.outputs:
            volume = open_volume(url, mode="r+")
            # a new content id whenever a block was rewritten: what a later stage (instances) keys its job on
            content = volume.provenance.get("content_id") if result.run.completed == 0 else None
            volume.set_provenance({**volume.provenance, "complete": True, "content_id": content or new_output_id()})
    if run.config.pyramid and result.run.ok:
        from pipeline.viewing.pyramid import add_pyramid, pyramid_is_current

        for url in result.outputs:
            if result.run.completed == 0 and pyramid_is_current(url, result.job_key):
                continue  # nothing changed since the pyramid was finished: a re-run stays a no-op
            pyramid = add_pyramid(client, url, progress=progress, key=result.job_key)
            result.extra.setdefault("pyramids", {})[url] = pyramid  # its failures count (`failures`)
    if result.run.ok and not result.failures:
        _show_written_versions(run)
    if run.config.instances is not None and result.run.ok:
        from pipeline.instances.run import run_instances

        follow = run.config.instances
        # by default it decodes what this run predicted: the first output, over the same region, in its shards
        update = {
            "input": follow.input or result.outputs[0],
            "roi": follow.roi or run.config.roi,
            "shard_size": _label_shards(follow, run.config.shard_size),
        }
        follow = follow.model_copy(update=update)
        result.extra["instances"] = run_instances(follow, client, progress=progress, force=force)
    return result
