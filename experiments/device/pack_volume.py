"""Carry a raw + label volume to a machine with no network, in parts small enough for one transfer each.

`pack` writes z-slabs of a raw/label pair as xz-compressed .npy files (EM raw compresses to ~75 %, labels to
almost nothing) with the volumes' metadata; `unpack` writes parts back into a local zarr group with the same
shape, chunks and voxel size, so a training config names it like the original. Used for the GPU runs in
`experiments/device/run.sh` (the lent GPU machine takes 64 MiB per call and reaches no file outside the repo);
`experiments/device/kit.sh` packs the parts.

    python experiments/device/pack_volume.py pack ../shared/data/lucchi/train.zarr .gpu/a --z 0:72
    python experiments/device/pack_volume.py unpack .gpu/a /tmp/mitoseg-data/train.zarr
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from daisy import Coordinate, Roi  # noqa: E402

from pipeline.volumes import VolumeMeta, create_volume, open_volume, volume_exists  # noqa: E402

ARRAYS = ("raw", "label")


def pack(group: Path, out: Path, z: tuple[int, int]) -> None:
    """Write slices z[0]..z[1] of GROUP/raw and GROUP/label into OUT."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {}
    for name in ARRAYS:
        volume = open_volume(str(group / name))
        shape = tuple(volume.meta.shape)
        roi = Roi((z[0], 0, 0), (z[1] - z[0], shape[1], shape[2]))
        buffer = io.BytesIO()
        np.save(buffer, volume.read(roi)[0])
        (out / f"{name}.npy.xz").write_bytes(lzma.compress(buffer.getvalue(), preset=6))
        m = volume.meta
        meta[name] = {
            "shape": shape,
            "dtype": str(m.dtype),
            "chunks": tuple(m.chunks),
            "voxel_size_nm": tuple(m.voxel_size_nm),
            "layer_type": m.layer_type,
        }
    (out / "part.json").write_text(json.dumps({"z": list(z), "arrays": meta}, indent=1))


def unpack(part: Path, group: Path) -> None:
    """Write the slab in PART into GROUP/raw and GROUP/label, creating them when absent."""
    info = json.loads((part / "part.json").read_text())
    z0 = info["z"][0]
    for name in ARRAYS:
        m = info["arrays"][name]
        url = str(group / name)
        if volume_exists(url):
            volume = open_volume(url, mode="r+")
        else:
            meta = VolumeMeta(
                shape=Coordinate(m["shape"]),
                dtype=np.dtype(m["dtype"]),
                chunks=Coordinate(m["chunks"]),
                voxel_size_nm=tuple(m["voxel_size_nm"]),
                layer_type=m["layer_type"],
            )
            volume = create_volume(url, meta)
        data = np.load(io.BytesIO(lzma.decompress((part / f"{name}.npy.xz").read_bytes())))
        volume.write(Roi((z0, 0, 0), data.shape), data[None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="GROUP OUT --z START:STOP")
    p.add_argument("group", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--z", required=True, help="slices START:STOP")
    u = sub.add_parser("unpack", help="PART GROUP")
    u.add_argument("part", type=Path)
    u.add_argument("group", type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        start, stop = (int(v) for v in args.z.split(":"))
        pack(args.group, args.out, (start, stop))
    else:
        unpack(args.part, args.group)


if __name__ == "__main__":
    main()
