#!/usr/bin/env bash
# Prepares, on the development machine, what experiments/device/run.sh needs on a lent GPU machine (no network
# there, 64 MiB per call), in .gpu/ (ignored through .git/info/exclude):
#   .gpu/site/site.tar.xz  the packages `mitoseg train`, `segment`, `evaluate` and benchmarks/inference.py import
#                          that the image lacks, installed here (`pip install --target`, CPython 3.12 wheels, the
#                          image's Python) and packed with xz: 12 MiB against the wheels' 18
#   .gpu/a, .gpu/b         the Lucchi training volume, z 0..SPLIT and SPLIT..165, raw and label (pack_volume.py)
# and checks that each call of run.sh's lease plan (the working tree + its carry) stays under 64 MiB.
#   bash experiments/device/kit.sh
#   PYVER=3.11 bash experiments/device/kit.sh    the same packages for this machine's Python, in .gpu/site-3.11
#                                                (to try the kit here: experiments/device/README.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF /.gpu/ .git/info/exclude 2>/dev/null || echo /.gpu/ >>.git/info/exclude
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
# At the versions of constraints.txt (what `make install` installs), so the GPU runs what the tests here run; monai is
# benchmarks/inference.py's comparison (the `bench` extra). The image has numpy, scipy, scikit-image, torch, pyyaml,
# psutil, tqdm, click, cloudpickle, toolz, msgpack, fsspec, jinja2, sortedcontainers, packaging, pytest, typer, rich
# and tensorboard.
NAMES=(
    pydantic pydantic-core annotated-types typing-inspection typing-extensions
    zarr numcodecs donfig google-crc32c
    daisy funlib-geometry
    dask distributed partd locket tblib tornado zict
    monai
)
[ "$PYVER" = 3.12 ] || NAMES+=(importlib-metadata lazy-importer) # dask needs them below Python 3.12 (the try here)
PINS=()
for name in "${NAMES[@]}"; do
    pin=$(grep -xE "$name==[^=]+" constraints.txt) || { echo "$name is not pinned in constraints.txt" >&2; exit 1; }
    PINS+=("$pin")
done
target=(--python-version "$PYVER" --implementation cp --only-binary=:all:)
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux_2_5_x86_64 manylinux1_x86_64; do target+=(--platform "$p"); done
SITE=.gpu/site
[ "$PYVER" = 3.12 ] || SITE=.gpu/site-$PYVER
if [ ! -f "$SITE/site.tar.xz" ]; then
    wheels=${XDG_CACHE_HOME:-$HOME/.cache}/mitoseg-device/wheels-$PYVER
    $PY -m pip download -q --no-deps "${target[@]}" -d "$wheels" "${PINS[@]}"
    names=$(printf '%s\n' "${PINS[@]}" | sed 's/==/-/; s/[-_.]/_/g' | tr '[:upper:]' '[:lower:]')
    files=()
    for whl in "$wheels"/*.whl; do # the pinned ones alone: the cache may hold older pins
        key=$(basename "$whl" | cut -d- -f1,2 | tr '[:upper:]' '[:lower:]' | sed 's/[-_.]/_/g')
        grep -qxF "$key" <<<"$names" && files+=("$whl")
    done
    [ ${#files[@]} -eq ${#PINS[@]} ] || { echo "found ${#files[@]} of the ${#PINS[@]} pinned wheels" >&2; exit 1; }
    tmp=$(mktemp -d)
    $PY -m pip install -q --no-index --no-deps --no-compile "${target[@]}" --target "$tmp/site" "${files[@]}"
    rm -rf "$tmp/site/bin" # console scripts with this machine's interpreter in them
    mkdir -p "$SITE"
    tar -C "$tmp/site" -cf - . | xz -6 -T2 >"$SITE/site.tar.xz"
    rm -rf "$tmp"
fi

DATA=${DATA:-../shared/data/lucchi/train.zarr}
SPLIT=${SPLIT:-72} # balances the two calls: call 1 also carries .gpu/site
packed() { $PY -c "import json, sys; sys.exit(json.load(open('.gpu/$1/part.json'))['z'] != [$2, $3])" 2>/dev/null; }
packed a 0 "$SPLIT" || $PY experiments/device/pack_volume.py pack "$DATA" .gpu/a --z "0:$SPLIT"
packed b "$SPLIT" 165 || $PY experiments/device/pack_volume.py pack "$DATA" .gpu/b --z "$SPLIT:165"

[ "$PYVER" = 3.12 ] || exit 0
limit=$((64 * 1024 * 1024))
# (du complains of files deleted but not yet committed, which do not travel)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1 || :)
size() { du -cb "$@" | tail -n 1 | cut -f1; }
kib() { echo "$(($1 / 1024)) KiB"; }
call1=$((tree + $(size .gpu/site .gpu/a)))
call2=$((tree + $(size .gpu/b)))
echo "working tree $(kib "$tree"), .gpu/site $(kib "$(size .gpu/site)"), .gpu/a $(kib "$(size .gpu/a)")," \
    ".gpu/b $(kib "$(size .gpu/b)")"
echo "call 1 (tree + .gpu/site + .gpu/a) $(kib $call1); call 2 (tree + .gpu/b) $(kib $call2); limit $(kib $limit)"
if [ $call1 -ge $limit ] || [ $call2 -ge $limit ]; then
    echo "a call is over 64 MiB: move SPLIT or carry less" >&2
    exit 1
fi
