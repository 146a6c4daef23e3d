"""Which inference patch, context and overlap keep accuracy while computing each voxel about once (issue #26).

Choice data: the selection slab z 130..164 of the Lucchi *training* volume (held out from the shipped network's
training, never the test volume). The slab is predicted as a block of a whole-volume run would predict it: tiles
of a grid over the whole 165 x 768 x 1024 volume, context read from the slices below it. Prints, per setting,
input voxels computed per output voxel (over the whole volume, one block), Jaccard at the checkpoint threshold
without and with the checkpoint's 7^3 median, the Jaccard of its mask with today's settings' mask (label-free:
how much the setting changes the result), and seconds.

    python experiments/inference/settings.py [--settings NAME...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import zarr
from daisy import Roi

from pipeline.median_filter import median_filter, median_margin
from pipeline.network.inputs import scale_input
from pipeline.stitching import PatchGrid, predict_region, read_mirrored, to_output_dtype
from workers.patch_predictor import Predictor

DATA = "../shared/data/lucchi/train.zarr"
SLAB = Roi((130, 0, 0), (35, 768, 1024))
SETTINGS = {
    # name: (patch, context, overlap, blending)
    "today": ((16, 256, 256), (2, 16, 16), 0.25, "gaussian"),
    "36x288-ov0": ((36, 288, 288), (2, 16, 16), 0.0, "gaussian"),
    "36x288-ov.125": ((36, 288, 288), (2, 16, 16), 0.125, "gaussian"),
    "40x320-ctx4,32-ov0": ((40, 320, 320), (4, 32, 32), 0.0, "gaussian"),
    "36x320-ctx2,32-ov0": ((36, 320, 320), (2, 32, 32), 0.0, "gaussian"),
    "24x288-ov0": ((24, 288, 288), (2, 16, 16), 0.0, "gaussian"),
    # the 7^3 median inside each tile (before blending) instead of on the blended map: blocks aligned with tiles
    # then compute no tile twice; the margin (>= network context + 3) is cropped after the median
    "tile-median-44x304-m6,24": ((44, 304, 304), (6, 24, 24), 0.0, "gaussian"),
    "tile-median-40x288-m4,16": ((40, 288, 288), (4, 16, 16), 0.0, "gaussian"),
    "tile-median-48x288-m8,16": ((48, 288, 288), (8, 16, 16), 0.0, "gaussian"),
    "tile-median-48x320-m8,32": ((48, 320, 320), (8, 32, 32), 0.0, "gaussian"),
    "tile-median-48x352-m8,48": ((48, 352, 352), (8, 48, 48), 0.0, "gaussian"),
    "tile-median-40x288-m4,16-ovz.5": ((40, 288, 288), (4, 16, 16), (0.5, 0.0, 0.0), "gaussian"),
    "tile-median-40x288-m4,16-ov.25": ((40, 288, 288), (4, 16, 16), 0.25, "gaussian"),
    "tile-median-16x256-m2,16-ov.25": ((16, 256, 256), (2, 16, 16), 0.25, "gaussian"),
    "tile-median-20x288-m2,16": ((20, 288, 288), (2, 16, 16), 0.0, "gaussian"),
    "tile-median-24x288-m4,16": ((24, 288, 288), (4, 16, 16), 0.0, "gaussian"),
}
AGREEMENT_WITH = "today"
"""Each setting's mask is also compared with this one's (median 7), label-free: how much the setting changes."""


def jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    inter = np.count_nonzero(pred & truth)
    return inter / max(1, np.count_nonzero(pred | truth))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--out", default="experiments/inference/settings.jsonl")
    parser.add_argument("--masks", default="/tmp/inference-settings", help="where each setting's slab mask is kept")
    args = parser.parse_args()
    raw_array = zarr.open_array(f"{DATA}/raw", mode="r")
    truth = np.asarray(zarr.open_array(f"{DATA}/label", mode="r")[SLAB.to_slices()]) > 0
    shape = tuple(raw_array.shape)
    predictor = Predictor("lucchi")
    threshold = predictor.checkpoint.threshold
    for name in args.settings:
        patch, context, overlap, blending = SETTINGS[name]
        tile_median = name.startswith("tile-median")
        predictor.context = predictor.network.context if tile_median else context
        forward = predictor
        if tile_median:
            trim = [m - c for m, c in zip(context, predictor.context, strict=True)]

            def forward(patch, trim=trim):
                probs = median_filter(predictor(patch), 7)
                return probs[(slice(None), *(slice(t, probs.shape[i + 1] - t) for i, t in enumerate(trim)))]

        grid = PatchGrid.with_overlap(patch, context, overlap, shape)
        margin = median_margin(7)
        region = SLAB.grow((margin,) * 3, (margin,) * 3).intersect(Roi((0, 0, 0), shape))
        read_roi = grid.read_roi(region)
        start = time.perf_counter()
        raw = scale_input(read_mirrored(lambda r: np.asarray(raw_array[r.to_slices()])[None], read_roi, shape))
        probs = predict_region(raw, read_roi, region, grid, forward, blending)
        seconds = time.perf_counter() - start
        inner = (slice(None), *(SLAB - region.offset).to_slices())
        scores = {}
        for median in (0,) if tile_median else (0, 7):
            stored = to_output_dtype(median_filter(probs, median)[inner], "uint8")[0]
            mask = stored >= threshold * 255.0
            scores[f"median{median}"] = jaccard(mask, truth)
            saved = Path(args.masks) / f"{name}-median{median}.npy"
            saved.parent.mkdir(parents=True, exist_ok=True)
            np.save(saved, mask)
            reference = Path(args.masks) / f"{AGREEMENT_WITH}-median7.npy"
            if reference.exists():
                scores[f"median{median}_agreement"] = jaccard(mask, np.load(reference))
        whole = sum(1 for _ in grid.tiles(Roi((0, 0, 0), shape)))
        row = {
            "setting": name,
            "patch": patch,
            "context": context,
            "overlap": overlap,
            "input_per_output_voxel": whole * int(np.prod(patch)) / int(np.prod(shape)),
            "seconds": round(seconds, 1),
            **{k: round(v, 4) for k, v in scores.items()},
        }
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
