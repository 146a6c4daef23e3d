"""Throughput and memory of `segment` against the bare network on the same patches and cores.

Prints one table: for two synthetic volumes 8x apart in size, the end-to-end voxels/s of a blockwise run
on a LocalCluster, the voxels/s of the bare forward pass over exactly the same patches (in this process, on
all cores, started with the workers' malloc settings), their ratio (the pipeline's own overhead; target >= 0.9), how
many patches the block partition computes against one whole-volume block (patches on block borders are
computed by each block they reach: larger blocks lower it), and the peak RSS of each worker (target: the 8x
volume within 20 %).

    python benchmarks/throughput.py [--checkpoint PATH] [--small 32,256,256] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


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


def bare_forward(run, predictor) -> tuple[float, int]:
    """Seconds of the network alone over exactly the patches the pipeline computed, and their count.

    Reading and padding happen outside the timed calls.
    """
    from pipeline.network.inputs import scale_input
    from pipeline.stitching import read_mirrored
    from pipeline.volumes import open_volume

    grid, source = run.job.grid, open_volume(run.job.input_url)
    count, seconds = 0, 0.0
    for block in run.plan.blocks():
        read_roi = grid.read_roi(block.write_roi)
        padded = scale_input(read_mirrored(source.read, read_roi, run.job.volume_shape))
        for tile in grid.tiles(block.write_roi):
            src = tile.grow(grid.context, grid.context)
            local = tuple(slice(b - f, e - f) for b, e, f in zip(src.begin, src.end, read_roi.begin, strict=True))
            patch = padded[(slice(None), *local)]
            if count == 0:
                predictor(patch)  # warm-up, as a worker's first block is
            start = time.perf_counter()
            predictor(patch)
            seconds += time.perf_counter() - start
            count += 1
    return seconds, count


def run_case(shape: tuple[int, int, int], args: argparse.Namespace, workdir: Path) -> dict:
    import torch
    from daisy import Roi

    from pipeline.cluster import dask_client
    from pipeline.config.cluster import LocalClusterConfig
    from pipeline.config.segment import SegmentConfig
    from pipeline.segment import prepare, segment
    from pipeline.synthetic import generate_volume
    from pipeline.volumes import VolumeMeta, create_volume
    from workers.patch_predictor import Predictor

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
    with dask_client(LocalClusterConfig(workers=args.workers)) as client:
        result = segment(cfg, client=client, progress=False).run
        rss = client.run(peak_rss_mb)
    run = prepare(cfg)
    torch.set_num_threads(os.cpu_count() or 1)  # all the cores the workers shared
    seconds, patches = bare_forward(run, Predictor(args.checkpoint))
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
    from pipeline.cluster import worker_environment

    start_env = worker_environment(os.cpu_count() or 1)
    if any(os.environ.get(k) != v for k, v in start_env.items() if k.startswith("MALLOC")):
        # glibc reads these at start: re-run this script with the workers' start environment, so that the
        # bare forward pass in this process is measured under the same conditions as the workers'
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **start_env})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="demo", help="a shipped network name or a .pt file")
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
    print(f"\nsegment vs bare network ({args.workers} worker(s), {cores} cores, {args.checkpoint})")
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
