"""Inference speed and accuracy side by side: `mitoseg segment`, MONAI's sliding window, the bare network.

On real data (default: the whole unseen Lucchi test half, 165 x 768 x 512; `--roi` takes a crop, copied to a
volume of its own so that every system sees the same voxels and no context beyond them), in one run:

- `mitoseg segment` as a user runs it: the CLI with its defaults (a LocalCluster, the checkpoint's recommended
  settings), start-up, reading and writing included; Jaccard by `mitoseg evaluate`; and again with tiles aligned
  with blocks (`FAST_SETTINGS`: every voxel computed about once);
- MONAI's `sliding_window_inference` with the same network as its users run it: eager, in memory, the
  checkpoint's patch, overlap 0.25, Gaussian weights, then the checkpoint's threshold (no median);
- the bare network once over non-overlapping patches of the checkpoint's shape (no I/O, no blending; mitoseg's
  optimised predictor): what the network itself allows.

Prints seconds, Mvoxels/s of output, Jaccard at the checkpoint's threshold, and each system's ratio to MONAI.
With `--device cuda` (a GPU machine) it also prints the network's FLOP per output voxel and mitoseg's fraction of
the FLOP-bound time at `--peak-tflops`.

    python benchmarks/inference.py [--data ../shared/data/lucchi/test_left.zarr] [--roi 58,128,0:48,512,512]
        [--checkpoint lucchi] [--workers 1] [--device cpu] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MITOSEG = "mitoseg segment (CLI, defaults, start-up included)"
MONAI = "MONAI sliding_window_inference (eager, overlap 0.25, gaussian)"
BARE = "bare network once over non-overlapping patches"
FAST = "mitoseg segment, tiles aligned with blocks (FAST_SETTINGS)"
FAST_SETTINGS = {"patch_shape": [40, 288, 288], "margin": [4, 16, 16], "overlap": [0, 0, 0]}
"""Tiles of 32 x 256 x 256 that each block computes once (docs/running.md, "Speed or accuracy")."""


def copy_crop(data: str, roi: str | None, workdir: Path) -> tuple[str, str, np.ndarray, np.ndarray]:
    """The crop `roi` of `data`/raw and `data`/label as volumes of their own; returns their URLs and arrays."""
    from pipeline.geometry import parse_roi
    from pipeline.volumes import create_volume, open_volume

    region = parse_roi(roi) if roi else open_volume(f"{data}/raw").meta.roi
    urls = []
    arrays = []
    for name in ("raw", "label"):
        source = open_volume(f"{data}/{name}")
        values = source.read(region)
        url = f"zarr://file://{workdir}/crop.zarr/{name}"
        meta = source.meta.derive(shape=tuple(region.shape))
        create_volume(url, meta).write(meta.roi, values)
        urls.append(url)
        arrays.append(values[0])
    return urls[0], urls[1], arrays[0], arrays[1]


def jaccard(prediction: np.ndarray, truth: np.ndarray) -> float:
    inter = np.count_nonzero(prediction & truth)
    return inter / max(1, np.count_nonzero(prediction | truth))


def run_mitoseg(raw_url: str, label_url: str, workdir: Path, args: argparse.Namespace, **settings: object) -> dict:
    """The CLI end to end on a job file of the checkpoint's defaults (or `settings`), as a user runs it; Jaccard by
    `mitoseg evaluate`."""
    import yaml

    mitoseg = [sys.executable, "-m", "pipeline"]  # the CLI of this interpreter (also where no script is installed)
    name = "-".join(settings) or "defaults"
    output = f"zarr://file://{workdir}/mitoseg-{name}.zarr/probs"
    job = {"input": raw_url, "output": [output], "checkpoint": args.checkpoint, "workers": args.workers, **settings}
    if args.device != "cpu":
        job["device"] = args.device
    job_file = workdir / f"{name}.yaml"
    job_file.write_text(yaml.safe_dump(job))
    start = time.perf_counter()
    subprocess.run([*mitoseg, "segment", str(job_file)], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    scores = subprocess.run(
        [*mitoseg, "evaluate", "--prediction", output, "--truth", label_url, "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return {"seconds": seconds, "jaccard": json.loads(scores.stdout)["jaccard"]}


def run_monai(raw: np.ndarray, truth: np.ndarray, loaded, device: str) -> dict:
    """MONAI's sliding window over the in-memory crop with the eager network, as its documentation shows it."""
    import torch
    from monai.inferers import sliding_window_inference

    network = loaded.network.eval().to(device)
    x = torch.from_numpy(raw.astype(np.float32) / 255.0)[None, None].to(device)
    start = time.perf_counter()
    with torch.no_grad():
        logits = sliding_window_inference(
            x, roi_size=loaded.patch_shape, sw_batch_size=1, predictor=network, overlap=0.25, mode="gaussian"
        )
        probs = torch.sigmoid(logits)[0, 0].cpu().numpy()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "jaccard": jaccard(probs >= loaded.threshold, truth)}


def run_bare(raw: np.ndarray, checkpoint: str, device: str) -> dict:
    """The optimised network once over non-overlapping patches (their cropped outputs tile the crop)."""
    from daisy import Roi

    from pipeline.network.inputs import scale_input
    from pipeline.stitching import PatchGrid, read_mirrored
    from workers.patch_predictor import Predictor

    predictor = Predictor(checkpoint, device=device)
    patch = predictor.checkpoint.patch_shape
    grid = PatchGrid.with_overlap(patch, predictor.context, 0.0, raw.shape)
    whole = Roi((0, 0, 0), raw.shape)
    read_roi = grid.read_roi(whole)
    padded = scale_input(read_mirrored(lambda r: raw[r.to_slices()][None], read_roi, raw.shape))
    patches = []
    for tile in grid.tiles(whole):
        src = tile.grow(grid.context, grid.context) - read_roi.offset
        patches.append(padded[(slice(None), *src.to_slices())])
    predictor(patches[0])  # warm-up, as a worker's first block is
    start = time.perf_counter()
    for p in patches:
        predictor(p)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "jaccard": None, "flop_per_voxel": flop_per_output_voxel(predictor, patches[0])}


def flop_per_output_voxel(predictor, patch: np.ndarray) -> float:
    """The network's FLOP per output voxel at this patch shape (torch's FLOP counter, one forward pass)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.from_numpy(np.ascontiguousarray(patch, dtype=np.float32))[None].to(predictor.device)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        predictor.network(x)
    cz, cy, cx = predictor.context
    out = (patch.shape[1] - 2 * cz) * (patch.shape[2] - 2 * cy) * (patch.shape[3] - 2 * cx)
    return counter.get_total_flops() / out


def bare_in_tuned_process(raw_url: str, args: argparse.Namespace) -> dict:
    """`run_bare` in a child process started with the workers' malloc settings (glibc reads them at start), so
    the bare network runs as well as a worker runs it; MONAI runs in this process, with the user's environment."""
    from pipeline.cluster import worker_environment

    env = {**os.environ, **worker_environment(os.cpu_count() or 1)}
    command = [sys.executable, __file__, "--bare-only", raw_url, "--checkpoint", args.checkpoint]
    command += ["--device", args.device]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/lucchi/test_left.zarr", help="zarr group with raw, label")
    parser.add_argument("--roi", default=None, help="crop OFFSET:SHAPE (z,y,x) of the data; default: all of it")
    parser.add_argument("--checkpoint", default="lucchi")
    parser.add_argument("--workers", type=int, default=1, help="mitoseg's local workers")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense fp16 peak (H100/H200)")
    parser.add_argument("--bare-only", metavar="RAW_URL", help=argparse.SUPPRESS)  # the child of the bare row
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if args.bare_only:
        from pipeline.volumes import open_volume

        source = open_volume(args.bare_only)
        print(json.dumps(run_bare(source.read(source.meta.roi)[0], args.checkpoint, args.device)))
        return
    if importlib.util.find_spec("monai") is None:
        raise SystemExit("MONAI is missing: pip install 'mitoseg[bench]' (or pip install monai)")
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data} is missing: pass --data with a zarr group holding raw and label")
    from pipeline.network.checkpoint import load_checkpoint

    loaded = load_checkpoint(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        raw_url, label_url, raw, label = copy_crop(args.data, args.roi, workdir)
        truth = label > 0
        rows = {
            MITOSEG: run_mitoseg(raw_url, label_url, workdir, args),
            FAST: run_mitoseg(raw_url, label_url, workdir, args, **FAST_SETTINGS),
            MONAI: run_monai(raw, truth, loaded, args.device),
            BARE: bare_in_tuned_process(raw_url, args),
        }
    voxels = int(raw.size)
    monai = rows[MONAI]["seconds"]
    where = f"{args.checkpoint}, {args.device}, {os.cpu_count()} cores"
    print(f"\n{args.roi or 'all'} of {args.data} ({voxels / 1e6:.1f} Mvoxels), {where}")
    print(f"{'system':<66} {'seconds':>8} {'Mvox/s':>7} {'x MONAI':>8} {'Jaccard':>8}")
    for name, row in rows.items():
        score = "-" if row["jaccard"] is None else f"{row['jaccard']:.3f}"
        print(
            f"{name:<66} {row['seconds']:>8.1f} {voxels / row['seconds'] / 1e6:>7.3f} "
            f"{monai / row['seconds']:>8.2f} {score:>8}"
        )
    flop = rows[BARE]["flop_per_voxel"]
    mitoseg = rows[MITOSEG]["seconds"]
    print(f"\nnetwork: {flop:.3g} FLOP per output voxel; mitoseg reached {flop * voxels / mitoseg / 1e9:.0f} GFLOP/s")
    if args.device == "cuda":
        bound = flop * voxels / (args.peak_tflops * 1e12)
        print(f"FLOP-bound time {bound:.2f} s at {args.peak_tflops:.0f} TFLOP/s: mitoseg at {bound / mitoseg:.1%}")


if __name__ == "__main__":
    main()
