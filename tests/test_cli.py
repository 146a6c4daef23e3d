"""The command line as a user runs it: options override the file, bad input fails with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import em_like, write_raw

from pipeline.config import load_config
from pipeline.config.cluster import LocalClusterConfig
from pipeline.config.segment import SegmentConfig
from pipeline.errors import ConfigError
from pipeline.volumes import open_volume

ROOT = Path(__file__).resolve().parents[1]


def mitoseg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd)


def test_options_override_the_file(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("input: a.zarr/raw\noutput: b.zarr/p\nblock_size: [32, 64, 64]\nworkers: 3\n")
    cfg = load_config(SegmentConfig, job, {"workers": 1, "block_size": None})
    assert cfg.cluster == LocalClusterConfig(workers=1)
    assert cfg.block_size == (32, 64, 64) and cfg.output == ["b.zarr/p"]
    job.write_text("input: a.zarr/raw\noutput: b.zarr/p\noverlap: [0.75, 0.25, 0.25]\n")
    assert load_config(SegmentConfig, job).overlap == (0.75, 0.25, 0.25)
    job.write_text("input: a.zarr/raw\noutput: b.zarr/p\noverlap: 0.5\n")
    assert load_config(SegmentConfig, job).overlap == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("input: a\noutput: b\nworkers: 0\n", r"workers: Input should be greater than or equal to 1 \(got 0\)"),
        ("input: a\noutput: b\noutput_dtype: int8\n", r"output_dtype: Input should be 'uint8', 'float16' or 'float32'"),
        ("input: a\noutput: b\nblok_size: [1, 2, 3]\n", r"blok_size: Extra inputs are not permitted"),
        ("input: a\noutput: b\noverlap: [0.5, 1.0, 0.25]\n", r"overlap\.1: Input should be less than 1 \(got 1\.0\)"),
        ("output: b\n", r"input: Field required"),
        ("- a\n- b\n", r"must hold a mapping"),
    ],
)
def test_invalid_files_name_field_value_and_allowed(tmp_path: Path, text: str, pattern: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(SegmentConfig, job)


def test_cli_error_exit_status_and_message(tmp_path: Path) -> None:
    out = mitoseg(
        "segment",
        "--input",
        str(tmp_path / "missing.zarr/raw"),
        "--output",
        str(tmp_path / "o.zarr/p"),
        "--block-size",
        "1,2",
    )
    assert out.returncode == 2 and "--block-size '1,2' must be three integers" in out.stderr
    out = mitoseg("segment", "--input", "a", "--output", "b", "--overlap", "0.5,1.0,0.25")
    assert out.returncode == 2 and "overlap.1: Input should be less than 1 (got 1.0)" in out.stderr
    out = mitoseg("segment", "--input", "a", "--output", "b", "--overlap", "half")
    assert out.returncode == 2 and "--overlap 'half' must be one fraction or three" in out.stderr
    out = mitoseg("evaluate", "--prediction", "a", "--truth", "b", "--kind", "bogus")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "'bogus' is not one of" in out.stderr
    out = mitoseg("segment", "--workers", "two")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    out = mitoseg("segment", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "nope.yaml does not exist" in out.stderr


@pytest.mark.cluster
def test_segment_command_end_to_end(tmp_path: Path, tiny_checkpoint: Path) -> None:
    raw = write_raw(f"{tmp_path}/em.zarr/raw", em_like((16, 64, 64)))
    out = f"{tmp_path}/p.zarr/probs"
    args = [
        "segment",
        "--input",
        raw,
        "--output",
        out,
        "--checkpoint",
        str(tiny_checkpoint),
        "--block-size",
        "16,64,64",
        "--workers",
        "1",
        "--roi",
        "0,0,0:16,64,64",
    ]
    first = mitoseg(*args, "--instances", f"{tmp_path}/seg.zarr/labels")
    assert first.returncode == 0, first.stderr
    assert "segment: 1 block(s) computed" in first.stdout and "relabel: 1 block(s) computed" in first.stdout
    assert "seg.zarr/labels" in first.stdout.split("view:")[1]
    assert open_volume(f"{tmp_path}/seg.zarr/labels").meta.layer_type == "segmentation"
    probs = open_volume(out)
    assert probs.meta.num_channels == 1 and probs.read(probs.meta.roi).dtype == np.uint8
    again = mitoseg(*args)
    assert "segment: 0 block(s) computed, 1 skipped" in again.stdout
    denser = mitoseg(*args, "--overlap", "0.75,0.25,0.25")  # another tile grid: the block is computed again
    assert denser.returncode == 0 and "segment: 1 block(s) computed" in denser.stdout, denser.stderr


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    out = mitoseg("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"mitoseg {version('mitoseg')}"


def test_examples_are_listed_with_their_purpose_and_copied_without_overwriting(tmp_path: Path) -> None:
    listed = mitoseg("examples")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")) and "demo" in names
    assert "The offline demo" in listed.stdout
    copied = mitoseg("examples", "demo", "--to", str(tmp_path / "jobs"))
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "jobs" / "demo.yaml").read_text() == (ROOT / "configs" / "demo.yaml").read_text()
    (tmp_path / "jobs" / "demo.yaml").write_text("mine\n")
    again = mitoseg("examples", "demo.yaml", cwd=tmp_path / "jobs")
    assert again.returncode == 2 and "demo.yaml already exist(s); pass --force" in again.stderr
    every = mitoseg("examples", "--to", str(tmp_path / "jobs"))
    assert every.returncode == 2 and (tmp_path / "jobs" / "demo.yaml").read_text() == "mine\n"
    assert not (tmp_path / "jobs" / "instances.yaml").exists()  # refused before copying anything
    forced = mitoseg("examples", "--to", str(tmp_path / "jobs"), "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.stem for p in (tmp_path / "jobs").glob("*.yaml")) == names
    assert (tmp_path / "jobs" / "demo.yaml").read_text() != "mine\n"
    unknown = mitoseg("examples", "dmeo")
    assert unknown.returncode == 2 and "no example is named 'dmeo'; the examples are demo" in unknown.stderr


def test_checkpoint_commands_inspect_export_and_average(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import json

    import torch

    from pipeline.network.checkpoint import load_checkpoint

    info = mitoseg("checkpoint", "info", str(tiny_checkpoint), "--json")
    assert info.returncode == 0, info.stderr
    facts = json.loads(info.stdout)
    digest = load_checkpoint(tiny_checkpoint).content_hash
    assert facts["content_hash"] == digest and facts["patch_shape"] == [8, 32, 32]
    table = mitoseg("checkpoint", "info", str(tiny_checkpoint))
    assert table.returncode == 0 and f"content_hash    {digest}" in table.stdout
    exported = mitoseg("checkpoint", "export", str(tiny_checkpoint), str(tmp_path / "e.pt"), "--median", "5")
    assert exported.returncode == 0 and digest in exported.stdout, exported.stderr
    assert load_checkpoint(tmp_path / "e.pt").median_size == 5
    soup = tmp_path / "soup.pt"
    averaged = mitoseg("checkpoint", "average", str(tiny_checkpoint), str(tmp_path / "e.pt"), "--output", str(soup))
    assert averaged.returncode == 0 and "the average of 2 checkpoint(s)" in averaged.stdout, averaged.stderr
    assert load_checkpoint(soup).content_hash == digest  # the mean of two identical networks is that network
    halved = mitoseg("checkpoint", "export", str(tiny_checkpoint), str(tmp_path / "h.pt"), "--half")
    assert halved.returncode == 0 and digest not in halved.stdout, halved.stderr
    stored = torch.load(tmp_path / "h.pt", weights_only=True)["state_dict"]
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    bad = mitoseg("checkpoint", "average", str(tiny_checkpoint), "--output", str(soup), "--threshold", "1.5")
    assert bad.returncode == 2 and "strictly between 0 and 1" in bad.stderr
    unknown = mitoseg("checkpoint", "info", "lucchy")
    assert unknown.returncode == 2 and "the shipped ones are demo, lucchi" in unknown.stderr
