"""Batch-friendly reporting through the command line: --summary-json, exit statuses, plain log lines, --help."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from conftest import em_like, write_raw
from test_stage_failures import fail_block
from typer.testing import CliRunner

from pipeline.cli import _log_handler, app
from pipeline.cli.options import config_default
from pipeline.config.instances import InstancesConfig
from pipeline.config.segment import SegmentConfig
from pipeline.network.checkpoint import load_checkpoint
from pipeline.viewing.pyramid import DownsampleBlock
from pipeline.volumes import parse_volume_url

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_raw(f"zarr://file://{tmp_path_factory.mktemp('raw')}/em.zarr/raw", em_like((16, 64, 64)))


def segment_args(raw: str, out: str, checkpoint: Path, client: Any, summary: Path) -> list[str]:
    return [
        "segment",
        "--input",
        raw,
        "--output",
        out,
        "--checkpoint",
        str(checkpoint),
        "--block-size",
        "16,32,32",
        "--scheduler",
        client.scheduler.address,
        "--summary-json",
        str(summary),
    ]


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args, catch_exceptions=True)


def test_segment_summary_counts_versions_and_a_failed_stage_then_its_repair(
    client: Any, raw: str, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("chunk_size: [8, 16, 16]\n")  # small chunks: the output gets a pyramid level
    out = str(parse_volume_url(f"zarr://file://{tmp_path}/p.zarr/probs"))
    summary = tmp_path / "reports" / "summary.json"
    args = [*segment_args(raw, out, tiny_checkpoint, client, summary), str(job)]
    with monkeypatch.context() as patch:
        fail_block(DownsampleBlock, patch, lambda task, block: task.level.index == 1)
        failed = invoke(args)
    assert failed.exit_code == 1, failed.output
    assert f"{out} pyramid s1 block 0" in failed.output and "injected" in failed.output
    record = json.loads(summary.read_text())
    assert record["command"] == "segment" and record["exit_code"] == 1 and record["status"] == "failed"
    [failure] = record["failures"]
    assert failure["unit"] == f"{out} pyramid s1 block" and failure["id"] == 0 and "injected" in failure["error"]
    stages = {s["stage"]: s for s in record["stages"]}
    assert stages["segment"]["completed"] == stages["segment"]["total"] == 4 and stages["segment"]["failed"] == 0
    assert stages["segment"]["voxels"] == 16 * 64 * 64 and stages["segment"]["voxels_per_second"] > 0
    assert stages["pyramid s1"]["failed"] == 1 and stages["pyramid s1"]["output"] == out
    assert record["blocks"]["failed"] == 1 and record["seconds"] >= stages["segment"]["seconds"]
    versions = record["versions"]
    assert versions["checkpoint_hash"] == load_checkpoint(str(tiny_checkpoint), device="cpu").content_hash
    assert versions["mitoseg"] and versions["torch"] and versions["python"]
    assert record["input"] == raw and record["outputs"] == [out]

    repaired = invoke(args)
    assert repaired.exit_code == 0, repaired.output
    record = json.loads(summary.read_text())
    assert record["status"] == "ok" and record["failures"] == [] and record["error"] is None
    stages = {s["stage"]: s for s in record["stages"]}
    assert stages["segment"]["completed"] == 0 and stages["segment"]["skipped"] == 4
    assert stages["pyramid s1"]["completed"] == stages["pyramid s1"]["total"] and stages["pyramid s1"]["failed"] == 0


def test_a_run_that_stops_on_an_error_still_writes_its_summary(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    args = ["segment", "--input", f"{tmp_path}/missing.zarr/raw", "--output", f"{tmp_path}/o.zarr/p"]
    result = invoke([*args, "--summary-json", str(summary)])
    assert result.exception is not None  # `mitoseg` (pipeline.cli.main) turns it into exit status 2
    record = json.loads(summary.read_text())
    assert record["exit_code"] == 2 and record["status"] == "error" and "missing.zarr" in record["error"]
    assert record["stages"] == [] and record["failures"] == []
    bad = invoke(["segment", "--block-size", "1,2", "--summary-json", str(summary)])
    assert bad.exception is not None and "--block-size '1,2'" in json.loads(summary.read_text())["error"]


def test_instances_summary_lists_its_passes_and_outputs(client: Any, tmp_path: Path) -> None:
    from test_instances_blockwise import generator_probabilities, write_probs

    source = write_probs(f"zarr://file://{tmp_path}/probs.zarr", generator_probabilities((16, 28, 30), seed=3))
    summary = tmp_path / "summary.json"
    table = str(tmp_path / "objects.csv")
    args = ["instances", "--input", source, "--output", f"{tmp_path}/seg.zarr", "--table", table]
    result = invoke(
        [*args, "--block-size", "8,16,16", "--scheduler", client.scheduler.address, "--summary-json", str(summary)]
    )
    assert result.exit_code == 0, result.output
    record = json.loads(summary.read_text())
    names = [s["stage"] for s in record["stages"]]
    assert names[:3] == ["decode", "match", "relabel"] and "meshes" in names and "pyramid s1" in names
    assert record["stages"][0]["total"] == 8 and record["outputs"][-1] == table
    assert (
        record["command"] == "instances" and record["status"] == "ok" and record["versions"]["checkpoint_hash"] is None
    )


def test_outside_a_terminal_log_lines_are_plain_and_unwrapped() -> None:
    handler = _log_handler()  # pytest's output is not a terminal
    assert type(handler) is logging.StreamHandler
    long = "x" * 300
    line = handler.format(logging.LogRecord("pipeline.segment", logging.INFO, __file__, 1, "%s", (long,), None))
    assert "\n" not in line and line.endswith(f"INFO pipeline.segment: {long}")


def test_a_second_run_into_a_leased_output_exits_2_naming_the_holder(tmp_path: Path) -> None:
    from test_lease import finish, first_line, holder

    out = f"{tmp_path}/p.zarr/probs"
    first = holder(f"file://{out}")
    try:
        assert first_line(first) == "held"
        run = subprocess.run(
            [sys.executable, "-m", "pipeline", "segment", "--input", "x.zarr/raw", "--output", out],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        finish(first)
    assert run.returncode == 2, run.stderr
    assert f"pid {first.pid}, since " in run.stderr and "--force" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(("command", "model"), [("segment", SegmentConfig), ("instances", InstancesConfig)])
def test_help_shows_defaults_and_the_allowed_values_of_every_choice(command: str, model: Any) -> None:
    group: Any = typer.main.get_command(app)
    options = {p.name: p for p in group.commands[command].params if p.param_type_name == "option"}
    assert options["workers"].show_default == config_default(model, "cluster.workers") == "1"
    if command == "segment":
        assert options["block_size"].show_default == "64,1024,1024"
        assert options["tta"].show_default == "none" and options["cluster"].show_default == "local"
        assert "<none|yx|zyx>" in invoke([command, "--help"]).output
        refused = invoke([command, "--tta", "bogus"])
        assert refused.exit_code == 2 and "'bogus' is not one of" in " ".join(refused.output.split())
    else:
        from pipeline.instances.run import DEFAULT_BLOCK

        assert options["block_size"].show_default == f"whole chunks near {','.join(map(str, DEFAULT_BLOCK))}"
    shown = invoke([command, "--help"]).output
    assert "--summary-json" in shown and "--force" in shown and "[default: (1)]" in shown
