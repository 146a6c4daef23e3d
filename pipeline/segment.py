"""Orchestration of `segment`: check the job, prepare outputs and plan, run the blocks on Dask, summarise.

Runs on the client. The per-block work lives in `workers.predict_block`; the network is loaded once per
worker by `workers.plugin.ModelPlugin`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from pipeline.config.segment import SegmentConfig
from pipeline.errors import ConfigError, StorageError
from pipeline.execution import RunResult, run_blockwise
from pipeline.geometry import as_zyx, parse_roi, roi_key
from pipeline.plan import BlockPlan, plan_blocks
from pipeline.resume import DoneMarkers, job_key
from pipeline.stitching import PatchGrid
from pipeline.volumes import Volume, VolumeMeta, create_volume, open_volume, parse_volume_url, volume_exists

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


@dataclass
class SegmentRun:
    """A checked, planned job ready to submit."""

    config: SegmentConfig
    plan: BlockPlan
    job: Any  # workers.predict_block.PredictJob
    done: DoneMarkers | None
    outputs: list[str]


@dataclass
class SegmentResult:
    """The outcome of a segment run: block counts and failures, and where the outputs are."""

    run: RunResult
    outputs: list[str]
    job_key: str
    extra: dict[str, Any] = field(default_factory=dict)


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
    )


def check_input(source: Volume) -> None:
    """Refuse inputs the network cannot read."""
    if source.meta.dtype.name not in INPUT_DTYPES:
        raise StorageError(
            f"input {source.url} holds {source.meta.dtype.name} voxels; "
            f"supported input types: {', '.join(INPUT_DTYPES)}"
        )
    if source.meta.num_channels != 1:
        raise StorageError(f"input {source.url} has {source.meta.num_channels} channels; the network needs one")


def _prepare_output(url: str, meta: VolumeMeta, resume: bool) -> Volume:
    """Open a compatible existing output (to resume it) or create a new one."""
    if resume:
        try:
            existing = open_volume(url, mode="r+")
        except StorageError:
            existing = None
        if existing is not None:
            found = (existing.meta.shape, existing.meta.num_channels, existing.meta.dtype)
            wanted = (meta.shape, meta.num_channels, meta.dtype)
            if found != wanted:
                raise StorageError(
                    f"output {url} exists with shape/channels/dtype {found}, but this job writes {wanted}; "
                    "choose another output, delete it, or run with --no-resume to replace it"
                )
            return existing
    return create_volume(url, meta)


def prepare(config: SegmentConfig) -> SegmentRun:
    """Check everything that can be checked before any work, create outputs, and plan the blocks."""
    from pipeline.network.checkpoint import resolve_checkpoint
    from workers.predict_block import PredictJob

    config = config.model_copy(update={"checkpoint": resolve_checkpoint(config.checkpoint)})  # a name -> its file
    source = open_volume(config.input, scale=config.input_scale)
    check_input(source)
    net = network_info(str(config.checkpoint))
    patch = tuple(config.patch_shape or net.patch_shape)
    bad = [p for p, d in zip(patch, net.size_divisor, strict=True) if p % d]
    if bad:
        raise ConfigError(f"patch_shape {patch} must be divisible by the network's size divisor {net.size_divisor}")
    grid = PatchGrid.with_overlap(patch, net.context, config.overlap, source.meta.shape)  # type: ignore[arg-type]
    median = net.median_size if config.median_size is None else config.median_size
    roi = parse_roi(config.roi) if config.roi else source.meta.roi
    out_meta = source.meta.derive(
        dtype=np.dtype(config.output_dtype),
        num_channels=net.out_channels,
        chunks=tuple(min(c, b) for c, b in zip(config.chunk_size, config.block_size, strict=True)),
        layer_type="image",
    )
    outputs = [str(parse_volume_url(u)) for u in config.output]
    if str(parse_volume_url(config.input)) in outputs:
        raise ConfigError(f"output {config.input} is the input volume; choose a different output")
    volumes = [_prepare_output(u, out_meta, config.resume) for u in outputs]
    chunks = volumes[0].meta.chunks
    if any(v.meta.chunks != chunks for v in volumes[1:]):
        raise StorageError(f"outputs {outputs} have different chunk shapes; each block must write whole chunks of all")
    margin = tuple(c + o for c, o in zip(net.context, grid.output_shape, strict=True))
    plan = plan_blocks(source.meta.shape, chunks, config.block_size, roi, context=margin)
    key = job_key(
        input=str(source.url),
        input_shape=source.meta.shape,
        scale=config.input_scale,
        roi=roi_key(roi),
        block=plan.block_shape,
        chunks=chunks,
        grid=grid,
        network=net.content_hash,
        dtype=config.output_dtype,
        blending=config.blending,
        tta=config.tta,
        median_size=median,
        outputs=outputs,
    )
    done = DoneMarkers(volumes[0].url.location, key)
    if not config.resume:
        done.clear()
    record = {
        "job_key": key,
        "input": str(source.url),
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
    for volume in volumes:
        volume.set_provenance(record)
    job = PredictJob(
        input_url=str(source.url),
        output_urls=tuple(outputs),
        volume_shape=source.meta.shape,
        grid=grid,
        output_dtype=config.output_dtype,
        blending=config.blending,
        tta=config.tta,
        median_size=median,
    )
    return SegmentRun(config, plan, job, done, outputs)


def execute(run: SegmentRun, client: Any, plugin: Any = None, progress: bool = True) -> SegmentResult:
    """Load the network on every worker and run the planned blocks."""
    from workers.plugin import ModelPlugin
    from workers.predict_block import predict_block

    config = run.config
    plugin = plugin or ModelPlugin(config.checkpoint, device=config.device, precision=config.precision)
    client.register_plugin(plugin)
    result = run_blockwise(
        client,
        run.plan,
        partial(predict_block, job=run.job),
        done=run.done,
        max_in_flight=config.max_in_flight,
        retries=config.retries,
        resources={"GPU": 1} if config.gpu_resource else None,
        description="segment",
        progress=progress,
    )
    return SegmentResult(result, run.outputs, run.done.key if run.done else "")


def segment(config: SegmentConfig, client: Any = None, plugin: Any = None, progress: bool = True) -> SegmentResult:
    """Run a whole segment job: on `client` when given, else on the cluster the config names."""
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
        return _execute_and_finish(run, client, plugin, progress)
    with dask_client(config.cluster, gpus=int(config.gpu_resource)) as own:
        return _execute_and_finish(run, own, plugin, progress)


def _execute_and_finish(run: SegmentRun, client: Any, plugin: Any, progress: bool) -> SegmentResult:
    """Run the blocks, then add the viewing pyramid to each output when every block succeeded."""
    result = execute(run, client, plugin, progress)
    if result.run.ok:
        for url in result.outputs:
            volume = open_volume(url, mode="r+")
            volume.set_provenance({**volume.provenance, "complete": True})
    if run.config.pyramid and result.run.ok:
        from pipeline.viewing.pyramid import add_pyramid

        for url in result.outputs:
            if result.run.completed == 0 and volume_exists(url, scale=1):
                continue  # nothing changed since the pyramid was built: a re-run stays a no-op
            pyramid = add_pyramid(client, url, progress=progress)
            result.extra.setdefault("pyramid_levels", {})[url] = len(pyramid.levels)
    if run.config.instances is not None and result.run.ok:
        from pipeline.instances.run import run_instances

        follow = run.config.instances
        # by default it decodes what this run predicted: the first output, over the same region
        follow = follow.model_copy(
            update={"input": follow.input or result.outputs[0], "roi": follow.roi or run.config.roi}
        )
        result.extra["instances"] = run_instances(follow, client, progress=progress)
    return result
