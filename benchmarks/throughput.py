"""Throughput and memory of `segment` against the bare network on the same patches and cores.

Prints one table: for two synthetic volumes 8x apart in size, the end-to-end voxels/s of a blockwise run
on a LocalCluster, the voxels/s of the bare forward pass over exactly the same patches (run afterwards by the
same workers with the same network object), their ratio (the pipeline's own overhead; target >= 0.9), how
many patches the block partition computes against one whole-volume block (patches on block borders are
computed by each block they reach: larger blocks lower it), and the peak RSS of each worker (target: the 8x
volume within 20 %).

    python benchmarks/throughput.py [--checkpoint models/demo.pt] [--small 32,256,256] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM on Linux).

    Not `ru_maxrss`: a worker spawned by fork + exec inherits its parent's high-water mark there, so a
    worker started from a process holding a large array would report that array.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare_forward(run, blocks: list) -> tuple[float, int]:
    """Seconds of the worker's own network alone over exactly the patches of `blocks`, and their count.

    Runs inside a Dask worker after the segment run, so process, threads and malloc settings are the ones
    the pipeline had; reading and padding happen outside the timed calls.
    """
    from pipeline.stitching import read_mirrored
    from workers.plugin import worker_predictor
    from workers.predict import _open
    from workers.predictor import scale_input

    predictor = worker_predictor()
    grid, source = run.job.grid, _open(run.job.input_url, "r")
    count, seconds = 0, 0.0
    for block in blocks:
        read_roi = grid.read_roi(block.write_roi)
        padded = scale_input(read_mirrored(source.read, read_roi, run.job.volume_shape))
        for tile in grid.tiles(block.write_roi):
            src = tile.grow(grid.context, grid.context)
            local = tuple(slice(b - f, e - f) for b, e, f in zip(src.begin, src.end, read_roi.begin, strict=True))
            start = time.perf_counter()
            predictor(padded[(slice(None), *local)])
            seconds += time.perf_counter() - start
            count += 1
    return seconds, count


def bare_on_workers(client, run) -> tuple[float, int]:
    """Voxels/s denominator: the blocks split over the workers, all computing at once as in the pipeline."""
    addresses = sorted(client.scheduler_info()["workers"])
    blocks = list(run.plan.blocks())
    futures = [
        client.submit(bare_forward, run, blocks[i :: len(addresses)], workers=[a], pure=False)
        for i, a in enumerate(addresses)
    ]
    results = client.gather(futures)
    return max(r[0] for r in results), sum(r[1] for r in results)


def run_case(shape: tuple[int, int, int], args: argparse.Namespace, workdir: Path) -> dict:
    from daisy import Roi

    from pipeline.cluster import dask_client
    from pipeline.config.segment import SegmentConfig
    from pipeline.segment import prepare, segment
    from pipeline.synthetic import generate_volume
    from pipeline.volumes import VolumeMeta, create_volume

    raw, _ = generate_volume(shape, seed=7)
    url = f"zarr://file://{workdir}/em-{'x'.join(map(str, shape))}.zarr/raw"
    meta = VolumeMeta(shape=shape, dtype=np.dtype(np.uint8), chunks=(32, 128, 128))
    create_volume(url, meta).write(meta.roi, raw[None])
    cfg = SegmentConfig(
        input=url,
        output=[f"zarr://file://{workdir}/out-{'x'.join(map(str, shape))}.zarr/probs"],
        checkpoint=args.checkpoint,
        block_size=args.block,
        chunk_size=(32, 128, 128),
        workers=args.workers,
        pyramid=False,
        resume=False,
    )
    del raw
    with dask_client(workers=args.workers) as client:
        result = segment(cfg, client=client, progress=False).run
        rss = client.run(peak_rss_mb)
        run = prepare(cfg)
        seconds, patches = bare_on_workers(client, run)
    whole = sum(1 for _ in run.job.grid.tiles(Roi((0, 0, 0), shape)))
    return {
        "shape": shape,
        "blocks": result.total,
        "segment": result.voxels_per_second,
        "bare": int(np.prod(shape)) / seconds,
        "recompute": patches / whole,
        "rss": max(rss.values()),
        "ok": result.ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "demo.pt")
    parser.add_argument("--small", default="32,256,256", help="Smaller volume Z,Y,X; the larger is 2x per axis.")
    parser.add_argument("--block", default="32,256,256", help="Write block Z,Y,X.")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    args.block = tuple(int(v) for v in args.block.split(","))
    small = tuple(int(v) for v in args.small.split(","))
    large = tuple(2 * v for v in small)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_case(s, args, Path(tmp)) for s in (small, large)]
    cores = os.cpu_count()
    print(f"\nsegment vs bare network ({args.workers} worker(s), {cores} cores, {args.checkpoint.name})")
    print(
        f"{'volume (z,y,x)':>18} {'voxels':>11} {'blocks':>6} {'segment Mvox/s':>15} {'bare Mvox/s':>12} "
        f"{'ratio':>6} {'patches/1-block':>16} {'peak RSS/worker':>16}"
    )
    for r in rows:
        print(
            f"{'x'.join(map(str, r['shape'])):>18} {int(np.prod(r['shape'])):>11,} {r['blocks']:>6} "
            f"{r['segment'] / 1e6:>15.3f} {r['bare'] / 1e6:>12.3f} {r['segment'] / r['bare']:>6.2f} "
            f"{r['recompute']:>16.2f} "
            f"{r['rss']:>13.0f} MB"
        )
    ratio = min(r["segment"] / r["bare"] for r in rows)
    growth = rows[1]["rss"] / rows[0]["rss"] - 1
    print(f"\ntarget: ratio >= 0.90 -> {'met' if ratio >= 0.9 else 'NOT met'} (worst {ratio:.2f})")
    print(f"target: peak RSS of the 8x volume within 20 % -> {'met' if growth <= 0.2 else 'NOT met'} ({growth:+.1%})")


if __name__ == "__main__":
    main()
