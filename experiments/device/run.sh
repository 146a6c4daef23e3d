#!/usr/bin/env bash
# What a lent GPU machine runs for mitoseg (issue #22): from a cold start, train the recipe on all 165 slices of the
# Lucchi training volume and bring the checkpoint back. That machine is a bare image (Python 3.12, PyTorch, CUDA,
# no network) that gets the working tree, the `carry` paths (64 MiB a call in all) and returns what is written
# under $OUT. experiments/device/kit.sh makes the carried .gpu/site (packages the image lacks) and .gpu/a, .gpu/b
# (the volume, z 0..72 and 72..165) on the development machine first.
#
# LEASE PLAN (15 minutes of device time in all, the machine's start of 1-2 minutes included; a machine stays warm
# 30 s after a call, so call 2 must follow call 1 at once to find what call 1 installed and unpacked):
#   call 1  command  bash experiments/device/run.sh setup; bash experiments/device/run.sh bench
#           carry    [".gpu/site", ".gpu/a"]      timeout_s 300      (about 3 minutes + the start)
#   call 2  command  bash experiments/device/run.sh train 7
#           carry    [".gpu/b"]                   timeout_s 570      (about 8.5 minutes)
#   then give_back. Call 2 brings back $OUT/<run>_last.pt (and the last two snapshots), train.log and logs.tgz.
#   MINUTES: at most 7 (one command's 10 minutes) and at most (budget_left_s in call 1's reply - 150) / 60, rounded
#   down, or the tool cuts call 2 short before the export (unpacking, start-up and export take about 1.5 minutes);
#   timeout_s = MINUTES * 60 + 150.
# If call 2 lands on a fresh machine (call 1's machine went back), `train` stops at once, saying so: the packages
# and part a are not there, and .gpu/site + .gpu/a + .gpu/b do not fit in one call. With the time left (at least
# 4 minutes are needed to start a machine), call `bash experiments/device/run.sh setup quick` with carry
# [".gpu/site", ".gpu/a"] and timeout_s 60, then at once call 2 with fewer minutes.
#
# Stages (each writes its log to $OUT/<stage>.log):
#   run.sh setup [quick]        unpack the packages into /tmp/mitoseg-site and part a into /tmp/mitoseg-data, print
#                               the GPU, torch and package versions, and (without `quick`) run the GPU and training
#                               tests (about 30 s)
#   run.sh bench                benchmarks/inference.py --device cuda on z 0..63 of the training volume (part a):
#                               mitoseg segment (defaults and tiles aligned with blocks), MONAI, the bare network;
#                               the table into $OUT/bench.log
#   run.sh train MINUTES [CONFIG]
#                               unpack part b, then `mitoseg train` of CONFIG (default configs/lucchi_gpu.yaml, the
#                               full 3D network from scratch; a fine-tune config with `init_from` works the same) on
#                               all 165 slices with no validation (choices are made by cross-validation elsewhere;
#                               the shipped network trains on all of train.zarr) for MINUTES (--time-budget), then
#                               the last checkpoint and the last two snapshots, exported small, into $OUT
# MITOSEG_DEVICE_SMOKE=1 shrinks the work to try the stages on a CPU (experiments/device/README.md): the tests'
# GPU cases skip, bench runs on the CPU over 8 x 128 x 128 voxels, train takes patches of 8 x 64 x 64, one a batch,
# made in the training process with one thread.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/mitoseg-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/mitoseg-site
DATA=/tmp/mitoseg-data/train.zarr
SMOKE=${MITOSEG_DEVICE_SMOKE:-0}
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
[ "$SMOKE" = 1 ] && export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

die() {
    echo "run.sh: $*" >&2
    exit 1
}

fresh_machine() {
    die "$1 is not on this machine: it is a fresh one, not the machine call 1 (setup) prepared (that one went back" \
        "30 s after its call). Run setup again (carry .gpu/site and .gpu/a), then this at once."
}

install_site() {
    [ -f $SITE/.installed ] && return
    [ -f .gpu/site/site.tar.xz ] || fresh_machine "the packages' folder $SITE"
    rm -rf $SITE && mkdir -p $SITE
    tar -C $SITE -xJf .gpu/site/site.tar.xz || die "could not unpack .gpu/site/site.tar.xz into $SITE"
    touch $SITE/.installed
    echo "unpacked .gpu/site into $SITE"
}

# Part $1 of the volume into $DATA, once per machine.
unpack() {
    [ -f "$DATA/.part-$1" ] && return
    [ -f ".gpu/$1/part.json" ] || fresh_machine "part $1 of the volume ($DATA)"
    python3 experiments/device/pack_volume.py unpack ".gpu/$1" $DATA || die "could not unpack part $1 into $DATA"
    touch "$DATA/.part-$1"
    echo "unpacked part $1 into $DATA"
}

setup() {
    install_site
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python3 - <<'EOF' || die "the packages do not import"
import os, platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, gpu {gpu}, "
      f"{os.cpu_count()} cores")
import daisy, dask, distributed, numcodecs, pydantic, zarr
print("packages:", {m.__name__: getattr(m, "__version__", "?") for m in (pydantic, zarr, numcodecs, dask, distributed)})
EOF
    unpack a
    [ "${1:-}" = quick ] && return
    echo "== tests (their GPU cases run where CUDA is)"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_device_path.py tests/test_training.py \
        tests/test_patch_predictor.py tests/test_median_filter.py 2>&1 | grep -v "^[0-9.]*s \(call\|setup\|teardown\)"
}

bench() {
    install_site
    unpack a
    local args=(--device cuda --roi "0,0,0:64,768,1024")
    [ "$SMOKE" = 1 ] && args=(--device cpu --roi "0,0,0:8,128,128")
    timeout 200 python3 benchmarks/inference.py --data $DATA "${args[@]}" --workers 1 2>&1 | grep -v " INFO "
}

# The last checkpoint of run folder $1 and its last two snapshots, exported small into $OUT as <run>_<name>.pt.
export_small() {
    python3 - "$OUT" "$1" <<'EOF'
import sys
from pathlib import Path
from pipeline.network.checkpoint import export_checkpoint
out, run = map(Path, sys.argv[1:])
for path in [*sorted(run.glob("step_*.pt"))[-2:], run / "last.pt"]:
    if path.exists():
        target = out / f"{run.name}_{path.stem}.pt"
        digest = export_checkpoint(path, target)
        print("exported", target, target.stat().st_size, "bytes, content hash", digest[:12])
EOF
}

train() {
    local minutes=$1 config=${2:-configs/lucchi_gpu.yaml}
    [ -f "$config" ] || die "no config $config"
    install_site
    unpack a
    unpack b
    local run
    run=runs/device/$(basename "$config" .yaml)_$(date +%H%M%S)
    mkdir -p "$run"
    # The config, trained on all of the carried volume with no validation (and shrunk for a CPU with SMOKE=1).
    python3 - "$config" "$run" "$DATA" "$SMOKE" <<'EOF' || die "cannot rewrite $config for the carried volume"
import sys, yaml
config, run, data, smoke = sys.argv[1:]
cfg = yaml.safe_load(open(config))
for volume in cfg["data"]["volumes"]:
    if "lucchi/train.zarr" not in volume["raw"] + volume["label"]:
        sys.exit(f"{config} trains on {volume['raw']}: only the Lucchi training volume travels")
    volume.update(raw=f"{data}/raw", label=f"{data}/label", train={"z": [0, 165]}, validation=None)
cfg["data"]["split_name"] = "lucchi-all (train z 0..164, no validation)"
cfg["output_dir"] = run
if smoke == "1":
    cfg["num_threads"] = 1
    cfg["data"].update(patch_shape=[8, 64, 64], batch_size=1, loader_workers=0)
    cfg.setdefault("optim", {})["warmup_iterations"] = 5  # the time budget ends a run only after the warm-up
    cfg.update(log_every=1, checkpoint_every=5, snapshot_every=5)
yaml.safe_dump(cfg, open(f"{run}/train.yaml", "w"), sort_keys=False)
EOF
    echo "== mitoseg train $config for $minutes minutes into $run"
    timeout $((${minutes%.*} * 60 + 120)) python3 -m pipeline train "$run/train.yaml" --time-budget "$minutes" 2>&1 \
        | tee "$run/train.out" | grep -v " INFO "
    local status=${PIPESTATUS[0]}
    sed -n '1p;$p' "$run/train.csv" 2>/dev/null
    export_small "$run"
    tar czf "$OUT/logs.tgz" "$run"/train.yaml "$run"/train.out "$run"/train.csv "$run"/config.json 2>/dev/null
    [ "$status" -eq 0 ] || die "training exited with $status (log: $run/train.out, in logs.tgz)"
}

case "${1:-}" in
    setup) setup "${2:-}" 2>&1 | tee "$OUT/setup.log" ;;
    bench) bench 2>&1 | tee "$OUT/bench.log" ;;
    train) train "${2:?give the training minutes}" "${3:-}" 2>&1 | tee "$OUT/train.log" ;;
    *) die "usage: run.sh setup [quick] | bench | train MINUTES [CONFIG]" ;;
esac
