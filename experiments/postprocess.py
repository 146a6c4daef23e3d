"""What post-processing buys a checkpoint on labelled data: median filter sizes (and optionally TTA).

Predicts the region once per TTA mode (sliding window, Gaussian blending, as `segment` and validation do), then
scores each median size at the checkpoint's stored threshold and at the threshold tuned on the region itself.
With `--margin`, it predicts N real slices above and below the region too (where the volume has them), as `segment`
reads context from the volume around its ROI; since the tile grid then starts N slices earlier, several margins
show how much a score depends on where the tiles fall. Prints one table.

    python experiments/postprocess.py               # the shipped lucchi.pt on the "lucchi-z130" validation slices
    python experiments/postprocess.py --median 0 3 5 7 --tta none yx --checkpoint runs/x/best.pt
    python experiments/postprocess.py --median 7 --margin 0 4 7 10            # tile-placement sensitivity
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LUCCHI = ROOT.parent / "shared" / "data" / "lucchi" / "train.zarr"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "pipeline" / "network" / "checkpoints" / "lucchi.pt"))
    parser.add_argument("--raw", default=str(LUCCHI / "raw"), help="raw volume URL")
    parser.add_argument("--label", default=str(LUCCHI / "label"), help="label volume URL (> 0 = mitochondrion)")
    parser.add_argument("--roi", default="130,0,0:35,768,1024", help="OFFSET:SHAPE to score (z,y,x voxels)")
    parser.add_argument("--median", type=int, nargs="+", default=[0, 5, 7], help="median sizes (0 = none)")
    parser.add_argument("--tta", nargs="+", default=["none"], choices=["none", "yx", "zyx"])
    parser.add_argument(
        "--margin", type=int, nargs="+", default=[0], help="real slices predicted above and below the region"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from pipeline.evaluation import count
    from pipeline.geometry import parse_roi
    from pipeline.median_filter import median_filter
    from pipeline.network.checkpoint import load_checkpoint
    from pipeline.training.validate import ThresholdTuner, predict_volume
    from pipeline.volumes import open_volume

    torch.set_num_threads(args.threads)
    roi = parse_roi(args.roi)
    source = open_volume(args.raw)
    truth = open_volume(args.label).read(roi)[0] > 0
    loaded = load_checkpoint(args.checkpoint)
    print(
        f"{args.checkpoint} (hash {loaded.content_hash[:12]}), region {args.roi}, stored threshold "
        f"{loaded.threshold:.3f}"
    )
    print("| margin | tta | median | Jaccard (stored t) | Jaccard (tuned t) | tuned t | Dice (tuned t) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for margin in args.margin:  # one read per margin, shared by the TTA modes
        grown = roi.grow((margin, 0, 0), (margin, 0, 0)).intersect(source.meta.roi)
        inner = (roi - grown.offset).to_slices()
        raw = source.read(grown)[0]
        for tta in args.tta:
            clock = time.perf_counter()
            prob = predict_volume(loaded.network, raw, loaded.patch_shape, loaded.network.context, tta=tta)
            predict_s = time.perf_counter() - clock
            for size in args.median:
                clock = time.perf_counter()
                mask = median_filter(prob, size)[0][inner]
                filter_s = time.perf_counter() - clock
                stored = count(mask >= loaded.threshold, truth)
                tuner = ThresholdTuner()
                tuner.update(mask, truth)
                tuned_t, tuned = tuner.best()
                print(
                    f"| {margin} | {tta} | {size or '-'} | {stored.jaccard:.4f} | {tuned.jaccard:.4f} | "
                    f"{tuned_t:.3f} | {tuned.dice:.4f} | {predict_s + filter_s:.0f} |"
                )


if __name__ == "__main__":
    main()
