"""Bad inputs to the instance stage fail before any work, with messages that say what to do."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.config.instances import InstancesConfig
from pipeline.errors import BlockFailedError, ConfigError, GeometryError, StorageError
from pipeline.instances.run import run_instances
from pipeline.volumes import VolumeMeta, create_volume, open_volume

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(url: str, shape=(8, 16, 16), channels: int = 1, dtype=np.uint8, layer: str = "image") -> str:
    meta = VolumeMeta(shape=shape, dtype=np.dtype(dtype), chunks=(4, 8, 8), num_channels=channels, layer_type=layer)
    data = np.zeros((channels, *shape), dtype)
    data[0, 2:6, 4:12, 4:12] = 230 if dtype == np.uint8 else 1  # above the seed threshold 0.85
    create_volume(url, meta).write(meta.roi, data)
    return url


class NoClient:
    """Stands in for a Dask client: these jobs must fail before any block is submitted."""

    def submit(self, *args, **kwargs):
        raise AssertionError("work was submitted")

    def scheduler_info(self, n_workers=-1):
        return {"n_workers": 0, "workers": {}}


CASES = [
    ("three channels", {"channels": 3}, {}, ConfigError, "3 channels; instances needs 1 \\(mask\\) or 2"),
    ("watershed on mask only", {}, {"decode": {"method": "watershed"}}, ConfigError, "needs mask and contour"),
    ("uint16 input", {"dtype": np.uint16}, {}, ConfigError, "must be uint8 .* or float"),
    ("labels as input", {"dtype": np.uint64, "layer": "segmentation"}, {}, ConfigError, "segmentation layer"),
    ("unaligned blocks", {}, {"block_size": (4, 8, 6)}, GeometryError, "whole number of output chunks"),
    ("region outside", {}, {"roi": "4,0,0:8,16,16"}, GeometryError, "outside the volume"),
    ("no output", {}, {"output": None}, ConfigError, "needs an input and an output"),
]


@pytest.mark.parametrize(("name", "volume", "settings", "error", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_bad_jobs_fail_before_any_work(tmp_path, name, volume, settings, error, pattern):
    source = write(str(tmp_path / "probs.zarr"), **volume)
    cfg = InstancesConfig(**{"input": source, "output": str(tmp_path / "seg.zarr"), **settings})
    with pytest.raises(error, match=pattern):
        run_instances(cfg, NoClient(), progress=False)


def test_a_partly_written_prediction_is_refused_before_any_work(tmp_path):
    source = write(str(tmp_path / "probs.zarr"))
    open_volume(source, mode="r+").set_provenance({"threshold": 0.5, "complete": False})
    cfg = InstancesConfig(input=source, output=str(tmp_path / "seg.zarr"))
    with pytest.raises(BlockFailedError, match="probs.zarr is incomplete.*before decoding instances"):
        run_instances(cfg, NoClient(), progress=False)
    assert not (tmp_path / "seg.zarr").exists()


def test_missing_input_is_a_storage_error(tmp_path):
    cfg = InstancesConfig(input=str(tmp_path / "absent.zarr"), output=str(tmp_path / "seg.zarr"))
    with pytest.raises(StorageError, match="absent.zarr"):
        run_instances(cfg, NoClient(), progress=False)


@pytest.mark.parametrize(
    ("shape", "dtype", "pattern"),
    [((8, 16, 8), np.uint64, "exists with shape \\(8, 16, 8\\)"), ((8, 16, 16), np.float32, "channel of uint64")],
)
def test_existing_output_of_another_shape_or_type_is_refused_when_resuming(tmp_path, shape, dtype, pattern):
    source = write(str(tmp_path / "probs.zarr"))
    output = str(tmp_path / "seg.zarr")
    write(output, shape=shape, dtype=dtype)
    cfg = InstancesConfig(input=source, output=output)
    with pytest.raises(GeometryError, match=pattern + ".*--no-resume"):
        run_instances(cfg, NoClient(), progress=False)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"dtype": "float32"}, "dtype: .*unsigned integer type.*'float32' cannot hold instance IDs"),
        ({"table": "objects.xlsx"}, "table: .*must end in .parquet or .csv"),
        ({"block_size": (0, 8, 8)}, "block_size: .*positive"),
        ({"decode": {"seed_threshold": 1.5}}, "decode.seed_threshold"),
        ({"decode": {"connectivity": 8}}, "decode.connectivity"),
        ({"input": "a.zarr", "output": "a.zarr"}, "output must differ from input"),
        ({"unknown": 1}, "unknown: Extra inputs are not permitted"),
    ],
)
def test_invalid_options_name_the_field(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(InstancesConfig, None, overrides)


def test_example_config_is_valid():
    cfg = load_config(InstancesConfig, CONFIGS / "instances.yaml")
    assert cfg.input == "data/demo/prediction.zarr/probs" and cfg.table == "data/demo/mitochondria.parquet"


def test_cli_reports_a_bad_input_with_exit_status_2(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    source = write(str(tmp_path / "probs.zarr"), channels=3)
    argv = ["mitoseg", "instances", "--input", source, "--output", str(tmp_path / "seg.zarr"), "--workers", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    assert "3 channels" in capsys.readouterr().err.replace("\n", " ")


@pytest.mark.cluster
def test_cli_runs_a_job_and_prints_the_summary(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    source = write(str(tmp_path / "probs.zarr"))
    table = tmp_path / "objects.csv"
    argv = ["mitoseg", "instances", "--input", source, "--output", str(tmp_path / "seg.zarr"), "--table", str(table)]
    monkeypatch.setattr(sys, "argv", [*argv, "--block-size", "4,8,8", "--workers", "1"])
    main()
    out = capsys.readouterr().out
    assert "instances: 1 objects" in out and table.exists()
    assert "8 objects at block faces" in " ".join(out.split())  # one provisional object in each of its 8 blocks
    labels = open_volume(str(tmp_path / "seg.zarr")).read(open_volume(str(tmp_path / "seg.zarr")).meta.roi)
    assert np.unique(labels).tolist() == [0, 1]
