"""Benchmark of the instance stage: time per stage, size of the equivalence table, and client memory of the merge.

Synthetic mask probabilities with spherical mitochondria on 100 blocks (5x5x4 and more). Three scenarios:
the base volume; the same scene scaled 2x per axis (8x the voxels, same blocks grid, same objects); and
the base volume with more objects. The equivalence table should follow the number of objects that touch
block borders, not the number of voxels.

A second table holds the same 100 blocks with a fixed set of rods across block faces and a growing number of
one-voxel objects inside blocks: the client's peak memory (Python allocations, tracemalloc) while it merges
should stay flat, since only the objects that touch a face between blocks reach the merge. The object table is
written from a batch of blocks' files at a time (256) in batches of rows (16,384): on these 100 blocks, all in one
batch, its peak grows with the objects; on more blocks than a batch it stops at that bound.

    python benchmarks/instances.py [--workers 2] [--method components|watershed] [--objects 60]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def scene(num_objects: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sphere centres and radii in a unit box (z, y, x fractions); radii as a fraction of the y/x extent."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (num_objects, 3)), rng.uniform(0.02, 0.05, num_objects)


def paint(shape: tuple[int, int, int], centres: np.ndarray, radii: np.ndarray, channels: int) -> np.ndarray:
    """(c, z, y, x) uint8 probabilities: mask = 1 - distance / radius, contour high at half the radius."""
    mask = np.zeros(shape, np.float32)
    dims = np.array(shape, np.float32)
    for centre, radius in zip(centres * dims, radii * shape[2], strict=True):
        lo = np.maximum(np.floor(centre - radius).astype(int), 0)
        hi = np.minimum(np.ceil(centre + radius).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        grid = np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi, strict=True)], indexing="ij")
        d = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        mask[box] = np.maximum(mask[box], np.clip(1 - d / radius, 0, 1))
    probs = [mask]
    if channels == 2:
        probs.append(np.clip(1 - np.abs(mask - 0.5) * 8, 0, 1))
    return np.round(np.stack(probs) * 255).astype(np.uint8)


def rods_and_dots(shape: tuple[int, int, int], block, num_rods: int, num_dots: int, channels: int) -> np.ndarray:
    """(c, z, y, x) uint8 probabilities: `num_rods` rods along z across the first z face between blocks, and
    `num_dots` one-voxel objects on a grid of step 4 that never touches a block face or a rod."""
    mask = np.zeros(shape, np.uint8)
    spots = [(y, x) for y in range(4, shape[1] - 4, 8) for x in range(4, shape[2] - 4, 8)]
    face = block[0]
    for y, x in spots[:: max(1, len(spots) // num_rods)][:num_rods]:
        mask[face - 6 : face + 6, y, x] = 255
    dots = np.stack(np.meshgrid(*[np.arange(2, s, 4) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    if num_dots > len(dots):
        raise SystemExit(f"at most {len(dots)} interior objects fit {shape}")
    mask[tuple(dots[np.linspace(0, len(dots) - 1, num_dots).astype(int)].T)] = 255
    return np.stack([mask, np.zeros_like(mask)][:channels])


def border_objects(table, block: tuple[int, int, int]) -> int:
    """Final objects whose bounding box crosses a block border."""
    cols = table.to_pydict()
    lo = np.stack([cols[f"bbox_min_{a}"] for a in "zyx"], axis=1)
    hi = np.stack([cols[f"bbox_max_{a}"] for a in "zyx"], axis=1) - 1
    return int(np.any(lo // np.array(block) != hi // np.array(block), axis=1).sum())


def run_case(client, root: Path, name: str, shape, block, chunks, centres, radii, method: str) -> dict:
    import pyarrow.parquet as pq

    channels = 2 if method == "watershed" else 1
    cfg, result, total = run_stage(client, root, name, block, chunks, paint(shape, centres, radii, channels), method)
    voxels = int(np.prod(shape))
    return {
        "case": name,
        "voxels": voxels,
        "blocks": result.decode.total,
        "objects": result.num_objects,
        "border objects": border_objects(pq.read_table(cfg.table), block),
        "equivalences": result.equivalences,
        "border IDs": result.border_ids,
        **{f"{stage} s": result.seconds.get(stage, 0.0) for stage in ("decode", "match", "fixup", "merge", "relabel")},
        "Mvox/s": voxels / total / 1e6,
    }


def traced(function: Callable[..., Any], peaks: list[int]) -> Callable[..., Any]:
    """`function`, appending to `peaks` the peak of Python memory allocated while it runs (tracemalloc)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tracemalloc.start()
        try:
            return function(*args, **kwargs)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    return wrapper


def memory_case(client, root: Path, shape, block, chunks, num_rods: int, num_dots: int, method: str) -> dict:
    """Client peak memory of the merge and of the table writer with `num_dots` objects inside blocks."""
    from pipeline.instances import run

    channels = 2 if method == "watershed" else 1
    merge, table = run._merge, run._write_table
    peaks: dict[str, list[int]] = {"merge": [], "table": []}
    run._merge, run._write_table = traced(merge, peaks["merge"]), traced(table, peaks["table"])
    try:
        probs = rods_and_dots(shape, block, num_rods, num_dots, channels)
        _, result, _ = run_stage(client, root, f"dots_{num_dots}", block, chunks, probs, method)
    finally:
        run._merge, run._write_table = merge, table
    return {
        "interior objects": num_dots,
        "objects": result.num_objects,
        "border objects (merged)": result.border_objects,
        "merge peak KiB": peaks["merge"][0] / 1024,
        "table writer peak KiB": peaks["table"][0] / 1024,
        "merge s": result.seconds["merge"],
    }


def run_stage(client, root: Path, name: str, block, chunks, probs: np.ndarray, method: str) -> tuple[Any, Any, float]:
    """Run the instance stage on `probs` (c, z, y, x): its config, result and seconds."""
    from pipeline.config.instances import InstancesConfig
    from pipeline.instances.run import run_instances
    from pipeline.volumes import VolumeMeta, create_volume

    shape = probs.shape[1:]
    meta = VolumeMeta(shape=shape, dtype=np.dtype(np.uint8), chunks=chunks, num_channels=probs.shape[0])
    source = f"{root}/{name}.zarr"
    create_volume(source, meta).write(meta.roi, probs)
    cfg = InstancesConfig(
        input=source,
        output=f"{root}/{name}_seg.zarr",
        table=f"{root}/{name}.parquet",
        block_size=block,
        decode={"method": method, "min_size": 0, "threshold": 0.5},
    )
    start = time.perf_counter()
    result = run_instances(cfg, client, progress=False)
    total = time.perf_counter() - start
    if not result.ok:
        raise SystemExit(f"{name}: blocks failed: {result.failures}")
    return cfg, result, total


def print_table(rows: list[dict]) -> None:
    headers = list(rows[0])
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print(" | ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="local Dask worker processes")
    parser.add_argument("--method", choices=["components", "watershed"], default="components")
    parser.add_argument("--objects", type=int, default=60, help="objects in the base scene")
    parser.add_argument("--rods", type=int, default=20, help="objects across block faces in the memory table")
    parser.add_argument(
        "--interior", type=int, nargs="+", default=[0, 1000, 4000, 16000, 25000], help="objects inside blocks, per case"
    )
    parser.add_argument("--keep", action="store_true", help="keep the volumes (printed location)")
    args = parser.parse_args()

    from pipeline.cluster import dask_client
    from pipeline.config.cluster import LocalClusterConfig

    base_shape, base_block, chunks = (64, 160, 160), (16, 32, 32), (16, 32, 32)
    big_shape = tuple(2 * s for s in base_shape)
    big_block = tuple(2 * b for b in base_block)
    centres, radii = scene(args.objects, seed=0)
    more_centres, more_radii = scene(4 * args.objects, seed=1)
    root = Path(tempfile.mkdtemp(prefix="mitoseg-bench-instances-"))
    rows, memory = [], []
    try:
        with dask_client(LocalClusterConfig(workers=args.workers)) as client:
            cases = [
                ("base", base_shape, base_block, centres, radii),
                ("8x voxels", big_shape, big_block, centres, radii),
                ("4x objects", base_shape, base_block, more_centres, more_radii),
            ]
            run_case(client, root, "warm_up", base_shape, base_block, chunks, centres, radii, args.method)
            for name, shape, block, c, r in cases:
                rows.append(run_case(client, root, name.replace(" ", "_"), shape, block, chunks, c, r, args.method))
            for num_dots in args.interior:
                memory.append(
                    memory_case(client, root, base_shape, base_block, chunks, args.rods, num_dots, args.method)
                )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\ninstances benchmark: method {args.method}, {args.workers} worker(s); times in seconds")
    print_table(rows)
    base, big, more = rows
    growth = big["equivalences"] / max(base["equivalences"], 1)
    print(
        f"\nequivalences per border object: {base['equivalences'] / max(base['border objects'], 1):.2f} (base), "
        f"{big['equivalences'] / max(big['border objects'], 1):.2f} (8x voxels), "
        f"{more['equivalences'] / max(more['border objects'], 1):.2f} (4x objects); "
        f"voxels x{big['voxels'] / base['voxels']:.0f} changed the table x{growth:.2f}"
    )
    print(f"\nclient memory of the merge: {args.rods} rods across block faces, growing objects inside blocks")
    print_table(memory)
    if args.keep:
        print(f"volumes kept in {root}")


if __name__ == "__main__":
    main()
