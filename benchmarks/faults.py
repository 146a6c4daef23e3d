"""The fault suite's scenarios on a larger synthetic volume, with the shipped demo network: a table of what was
injected, what was retried and recomputed, and how many voxels differ from an uninterrupted run (must be 0).

    python benchmarks/faults.py [--shape 48,192,192] [--block 16,64,64] [--workers 2]

Each row runs on a LocalCluster of worker processes (the whole-run kill runs `mitoseg segment` as a subprocess).
"Exit" is the status `mitoseg segment` gives for that outcome (0 complete, 1 blocks failed, 2 refused).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config.segment import SegmentConfig  # noqa: E402
from pipeline.faults import FailWrites, KillWorkerAtBlock  # noqa: E402
from pipeline.segment import segment  # noqa: E402
from pipeline.synthetic import generate_volume  # noqa: E402
from pipeline.volumes import VolumeMeta, create_volume, open_volume  # noqa: E402


@dataclass
class Row:
    scenario: str
    injected: int
    retried: int
    recomputed: int
    differing: int
    exit: str
    """The run's exit status; for a scenario run twice, the first run's, then the second's."""


def read_all(url: str) -> np.ndarray:
    volume = open_volume(url)
    return volume.read(volume.meta.roi)


def exit_status(result) -> int:  # noqa: ANN001
    return 0 if not result.failures else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="48,192,192", help="Synthetic volume Z,Y,X in voxels.")
    parser.add_argument("--block", default="16,64,64", help="Write block Z,Y,X in voxels.")
    parser.add_argument("--workers", type=int, default=2, help="Worker processes.")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    block = tuple(int(v) for v in args.block.split(","))
    from distributed import Client, LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        raw = f"zarr://file://{tmp}/em.zarr/raw"
        data, _ = generate_volume(shape, seed=7)
        meta = VolumeMeta(shape=shape, dtype=np.dtype("uint8"), chunks=block, voxel_size_nm=(5.0, 5.0, 5.0))
        create_volume(raw, meta).write(meta.roi, data[None])

        def job(out: str, **kw: object) -> SegmentConfig:
            fields = dict(input=raw, output=[out], checkpoint="demo", block_size=block, chunk_size=block)
            return SegmentConfig(**{**fields, "pyramid": False, **kw})

        grid = [-(-s // b) for s, b in zip(shape, block, strict=True)]
        offsets = [(0, block[1], block[2]), (block[0], 0, block[2] * (grid[2] - 1))]
        rows: list[Row] = []
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None)
        with cluster, Client(cluster) as client:
            ref_url = f"zarr://file://{tmp}/reference.zarr"
            reference = segment(job(ref_url), client=client, progress=False)
            total = reference.run.total
            expected = read_all(ref_url)

            def faulty(name: str, fault, again: bool, **kw: object) -> None:  # noqa: ANN001
                out = f"zarr://file://{tmp}/{name.replace(' ', '_')}.zarr"
                client.register_plugin(fault)
                try:
                    first = segment(job(out, **kw), client=client, progress=False)
                finally:
                    client.unregister_worker_plugin(fault.name)
                recomputed, status = 0, str(exit_status(first))
                if again:
                    second = segment(job(out), client=client, progress=False)
                    recomputed, status = second.run.completed, f"{status} -> {exit_status(second)}"
                injected = fault.count()
                retried = injected - len(first.run.failures) if not fault.always else 0
                differing = int((read_all(out) != expected).sum())
                rows.append(Row(name, injected, max(retried, 0), recomputed, differing, status))

            stamp = str(time.time_ns())
            faulty("worker killed mid-block", KillWorkerAtBlock(offsets, f"{tmp}/m1-{stamp}"), again=False)
            faulty(
                "block always kills its worker, re-run",
                KillWorkerAtBlock(offsets[:1], f"{tmp}/m2-{stamp}", always=True),
                again=True,
            )
            faulty("transient write failures", FailWrites(offsets, f"{tmp}/m3-{stamp}"), again=False)
            faulty(
                "unwritable block, re-run",
                FailWrites(offsets[1:], f"{tmp}/m4-{stamp}", always=True),
                again=True,
                retries=1,
            )

            # an input chunk rewritten in place: only the blocks that read it recompute
            out = f"zarr://file://{tmp}/incremental.zarr"
            segment(job(out), client=client, progress=False)
            changed = data.copy()
            changed[: block[0], : block[1], : block[2]] = 255 - changed[: block[0], : block[1], : block[2]]
            create_volume(raw, meta).write(meta.roi, changed[None])
            rerun = segment(job(out), client=client, progress=False)
            fresh_url = f"zarr://file://{tmp}/fresh.zarr"
            segment(job(fresh_url), client=client, progress=False)
            differing = int((read_all(out) != read_all(fresh_url)).sum())
            rows.append(Row("input chunk rewritten", 1, 0, rerun.run.completed, differing, str(exit_status(rerun))))
            create_volume(raw, meta).write(meta.roi, data[None])

        rows.append(_whole_run_killed(tmp, raw, block, expected))
    print(f"{total} blocks of {block} over {shape}, demo network, {args.workers} worker processes\n")
    print(f"| {'scenario':<40} | injected | retried | recomputed | voxels differing | exit   |")
    print(f"|{'-' * 42}|----------|---------|------------|------------------|--------|")
    for row in rows:
        print(
            f"| {row.scenario:<40} | {row.injected:>8} | {row.retried:>7} | {row.recomputed:>10} | "
            f"{row.differing:>16} | {row.exit:>6} |"
        )


def _whole_run_killed(tmp: str, raw: str, block: tuple[int, ...], expected: np.ndarray) -> Row:
    """`mitoseg segment` SIGKILLed with its workers after some blocks are written, then run again."""
    out_path = Path(tmp) / "killed.zarr"
    config = {"input": raw, "output": f"zarr://file://{out_path}", "checkpoint": "demo", "pyramid": False}
    config.update(block_size=list(block), chunk_size=list(block), cluster={"kind": "local", "workers": 1})
    job_file = Path(tmp) / "killed.yaml"
    job_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "pipeline", "segment", str(job_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        command, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def written() -> int:
        return sum(1 for p in out_path.rglob("*") if p.is_file() and not p.name.startswith((".z", "zarr.json")))

    while written() < 2 and first.poll() is None:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = written()
    second = subprocess.run(command, capture_output=True, text=True, env=env)
    differing = int((read_all(f"zarr://file://{out_path}") != expected).sum())
    return Row("whole run SIGKILLed, restarted", 1, 0, written() - before, differing, f"-9 -> {second.returncode}")


if __name__ == "__main__":
    main()
