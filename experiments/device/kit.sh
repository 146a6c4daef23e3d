#!/usr/bin/env bash
# Prepares, on the development machine, what experiments/device/run.sh needs on a lent GPU machine (no network
# there, 64 MiB per call): .whl/ with wheels (Python 3.12, the image's) of the packages training needs that its
# image lacks, and .gpu/a, .gpu/b with the Lucchi volume in two xz parts. Both folders are kept out of git.
#   bash experiments/device/kit.sh        then, on the device: call 1 carry [".whl", ".gpu/a"] `run.sh check`
#                                        (or just install and unpack a), call 2 carry [".gpu/b"] `run.sh finetune 7`;
#                                        or one call carry [".whl", ".gpu/val", checkpoints] `run.sh score CKPT...`
set -euo pipefail
cd "$(dirname "$0")/../.."
for path in /.whl/ /.gpu/; do grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude; done
PY=${PY:-.venv/bin/python}
mkdir -p .whl
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 \
    manylinux1_x86_64; do platforms+=" --platform $p"; done
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
    zarr==3.4.2 numcodecs==0.17.1 donfig==0.8.1.post1 google-crc32c==1.9.0 crc32c==2.9.post0 msgspec==0.22.0 \
    daisy==2.0.0 funlib.geometry==0.3.0 dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 \
    tblib==3.2.2 tornado==6.6.1 zict==3.0.0
DATA=${DATA:-../shared/data/lucchi/train.zarr}
[ -f .gpu/a/part.json ] || $PY experiments/device/pack_volume.py pack "$DATA" .gpu/a --z 0:70
[ -f .gpu/b/part.json ] || $PY experiments/device/pack_volume.py pack "$DATA" .gpu/b --z 70:165
[ -f .gpu/val/part.json ] || $PY experiments/device/pack_volume.py pack "$DATA" .gpu/val --z 120:165
du -sh .whl .gpu/a .gpu/b .gpu/val
