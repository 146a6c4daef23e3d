#!/usr/bin/env bash
# What a lent GPU machine runs for mitoseg: a bare image with PyTorch and CUDA, no network, only this repository.
# The repository travels with .whl/ (wheels of the dependencies the image lacks: pydantic, zarr, numcodecs,
# daisy, dask, distributed, ...) and .gpu/<part> (z-slabs of the Lucchi volume made by pack_volume.py), both
# ignored by git and made on the development machine by experiments/device/kit.sh. Results go to $OUT. Stages:
#   run.sh check            environment, unpack part a, the GPU tests, `segment` + `evaluate` on the GPU,
#                           the training-speed table (benchmarks/train_speed.py)
#   run.sh train MINUTES    unpack part b, then configs/lucchi_gpu.yaml and experiments/configs/lucchi_gpu_ft.yaml side by
#                           side for MINUTES (no validation there: the held-out slab stays behind), and the
#                           last checkpoint and last two snapshots of each, exported small, into $OUT
#   run.sh finetune MINUTES unpack part b (the validation slab with it), then experiments/configs/lucchi_gpu_soup_{a,b,c}.yaml
#                           side by side for MINUTES, each validated on the GPU, and each run's best checkpoint,
#                           exported small, into $OUT (to be averaged with pipeline/network/checkpoints/lucchi.pt where it is scored)
#   run.sh soup MINUTES     unpack part b, then experiments/configs/lucchi_gpu_b1.yaml with seeds 41-46 side by side (batch 1,
#                           batch 2 for 45 and 46) for MINUTES, each run's best exported into $OUT; then two averages,
#                           "cpu" (pipeline/network/checkpoints/lucchi.pt and /tmp/cpu_soup.pt, an export of runs/lucchi_cpu_soup/best.pt
#                           carried in call 1) and "all" (those and each run whose best validation Jaccard is
#                           >= 0.875), each scored as `score` does (give 4 MINUTES to stay in one call's 10)
#   run.sh score CKPT...    unpack part val (z 120..164: the held-out slab and the context above it), then for each
#                           checkpoint `segment` of the held-out slab without and with --tta yx, `evaluate`, and the
#                           probability volumes into $OUT/preds.tgz (for `instances` where its tools are);
#                           OVERLAP=0.75,0.25,0.25 run.sh score ... scores with a denser z stride (default 0.25)
set -uo pipefail
OUT=${OUT:-/tmp/mitoseg-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/mitoseg-site
if [ ! -f $SITE/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl \
        && touch $SITE/.installed || exit 1
fi
# The image lacks cloud-files (and its dependency tree); segment's done-records need only the shim's three calls.
export PYTHONPATH=$SITE:$PWD/experiments/device/shim:$PWD
DATA=../shared/data/lucchi/train.zarr
unpack() { python3 experiments/device/pack_volume.py unpack ".gpu/$1" $DATA && echo "unpacked part $1 into $DATA"; }

# Export the checkpoints named (those that exist) small into $OUT as <run folder>_<name>.pt.
export_small() {
    python3 - "$OUT" "$@" <<'EOF'
import sys
from pathlib import Path
from pipeline.network.checkpoint import export_checkpoint
for path in map(Path, sys.argv[2:]):
    if path.exists():
        target = Path(sys.argv[1]) / f"{path.parent.name}_{path.stem}.pt"
        export_checkpoint(path, target)
        print("exported", target, target.stat().st_size)
EOF
}

check() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    unpack a
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_predictor.py tests/test_training.py \
        tests/test_losses.py tests/test_distributed.py 2>&1 | tail -15
    echo "== segment slices 0..31 with the shipped network on the GPU, then evaluate"
    /usr/bin/time -f "segment wall %e s" python3 -m pipeline segment --input $DATA/raw --roi 0,0,0:32,768,1024 \
        --output /tmp/mitoseg-pred.zarr/probs --workers 2 2>&1 | grep -v " INFO " | tail -5
    python3 -m pipeline evaluate --prediction /tmp/mitoseg-pred.zarr/probs --truth $DATA/label --json
    echo "== training speed"
    python3 benchmarks/train_speed.py --config experiments/configs/lucchi_gpu_ft.yaml --batch 1 8 --workers 0 6 \
        --iterations 40 2>&1 | grep -v " INFO " | tail -8
    python3 benchmarks/train_speed.py --config configs/lucchi_gpu.yaml --batch 8 --workers 6 \
        --precision bf16 fp32 --iterations 40 2>&1 | grep -v " INFO " | tail -6
}

train() {
    local minutes=$1
    unpack b
    for name in lucchi_gpu lucchi_gpu_ft; do
        python3 - "$name" <<'EOF'
import sys, yaml
name = sys.argv[1]
folder = "configs" if name == "lucchi_gpu" else "experiments/configs"
cfg = yaml.safe_load(open(f"{folder}/{name}.yaml"))
for volume in cfg["data"]["volumes"]:
    volume["validation"] = None
yaml.safe_dump(cfg, open(f"/tmp/{name}.yaml", "w"))
EOF
        timeout $((minutes * 60 + 120)) python3 -m pipeline train /tmp/$name.yaml --time-budget "$minutes" \
            > "runs_$name.log" 2>&1 &
    done
    wait
    tail -n 3 runs_*.log
    for name in lucchi_gpu lucchi_gpu_ft; do
        # shellcheck disable=SC2012
        export_small $(ls runs/$name/step_*.pt 2>/dev/null | tail -n 2) runs/$name/last.pt
    done
    tar czf "$OUT/logs.tgz" runs_*.log runs/lucchi_gpu*/train.csv runs/lucchi_gpu*/config.json
}

finetune() {
    local minutes=$1
    unpack b
    for v in a b c; do
        timeout $((minutes * 60 + 120)) python3 -m pipeline train experiments/configs/lucchi_gpu_soup_$v.yaml \
            --time-budget "$minutes" > "runs_soup_$v.log" 2>&1 &
    done
    wait
    grep -h -i "validation\|error" runs_soup_*.log | tail -n 30
    export_small runs/lucchi_gpu_soup_{a,b,c}/best.pt
    tar czf "$OUT/logs.tgz" runs_soup_*.log runs/lucchi_gpu_soup_*/*.csv
}

soup() {
    local minutes=$1 seed
    unpack b
    for seed in 41 42 43 44 45 46; do
        python3 - "$seed" <<'EOF'
import sys, yaml
seed = int(sys.argv[1])
cfg = yaml.safe_load(open("experiments/configs/lucchi_gpu_b1.yaml"))
cfg.update(seed=seed, output_dir=f"runs/lucchi_gpu_b1_s{seed}")
cfg["data"]["batch_size"] = 2 if seed >= 45 else 1
yaml.safe_dump(cfg, open(f"/tmp/b1_s{seed}.yaml", "w"))
EOF
        timeout $((minutes * 60 + 150)) python3 -m pipeline train "/tmp/b1_s$seed.yaml" --time-budget "$minutes" \
            > "runs_b1_s$seed.log" 2>&1 &
    done
    wait
    grep -h -i "stopped at\|error" runs_b1_*.log | tail -n 20
    head -n 20 runs/lucchi_gpu_b1_s*/val.csv
    export_small runs/lucchi_gpu_b1_s*/best.pt
    tar czf "$OUT/logs.tgz" runs_b1_*.log runs/lucchi_gpu_b1_*/*.csv
    python3 - <<'EOF'
import csv, glob
from pipeline.network.checkpoint import average_checkpoints
keep = []
for run in sorted(glob.glob("runs/lucchi_gpu_b1_s*")):
    best = max(float(row["jaccard"]) for row in csv.DictReader(open(f"{run}/val.csv")))
    keep += [f"{run}/best.pt"] if best >= 0.875 else []
cpu = ["pipeline/network/checkpoints/lucchi.pt", "/tmp/cpu_soup.pt"]
for name, members in {"cpu": cpu, "all": cpu + keep}.items():
    print("average", name, average_checkpoints(members, f"/tmp/soup_{name}.pt")[:12], members)
EOF
    score /tmp/soup_all.pt /tmp/soup_cpu.pt
}

# `segment` of the held-out slab with each checkpoint named, without and with --tta yx, then `evaluate`.
score() {
    local ckpt name mode
    mkdir -p /tmp/preds
    for ckpt in "$@"; do
        name=$(basename "$ckpt" .pt)
        for mode in none yx; do
            /usr/bin/time -f "segment wall %e s" timeout 150 python3 -m pipeline segment --checkpoint "$ckpt" \
                --input $DATA/raw --roi 130,0,0:35,768,1024 --output "/tmp/preds/${name}_$mode.zarr" --tta $mode \
                --overlap "${OVERLAP:-0.25}" --workers 1 2>&1 | grep "segment\|rror"
            echo "$name $mode $(python3 -m pipeline evaluate --prediction "/tmp/preds/${name}_$mode.zarr" \
                --truth $DATA/label --json)"
        done
        tar czf "$OUT/preds.tgz" -C /tmp/preds .
    done
}

case "${1:-}" in
    check) check 2>&1 | tee "$OUT/check.log" ;;
    train) train "${2:?give the training minutes}" 2>&1 | tee "$OUT/train.log" ;;
    finetune) finetune "${2:?give the training minutes}" 2>&1 | tee "$OUT/finetune.log" ;;
    soup) soup "${2:?give the training minutes}" 2>&1 | tee "$OUT/soup.log" ;;
    score) shift; { unpack val && score "${@:?give checkpoints}"; } 2>&1 | tee "$OUT/score.log" ;;
    *) echo "usage: run.sh check | train MINUTES | finetune MINUTES | soup MINUTES | score CKPT..." >&2; exit 2 ;;
esac
