"""Synthetic EM-like volumes: deterministic, labelled, dark mitochondria, zarr output, written where absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.config.train import DataConfig
from pipeline.synthetic import ensure_synthetic_training_data, generate_volume, write_volume_zarr
from pipeline.volumes import create_volume, open_volume


def test_same_seed_same_volume_other_seed_other_volume() -> None:
    raw_a, label_a = generate_volume((16, 64, 64), seed=3)
    raw_b, label_b = generate_volume((16, 64, 64), seed=3)
    raw_c, _ = generate_volume((16, 64, 64), seed=4)
    assert np.array_equal(raw_a, raw_b) and np.array_equal(label_a, label_b)
    assert not np.array_equal(raw_a, raw_c)


def test_volume_has_expected_dtypes_fraction_and_contrast() -> None:
    raw, label = generate_volume((32, 128, 128), seed=0, mito_fraction=0.1)
    assert raw.dtype == np.uint8 and label.dtype == np.uint8
    assert raw.shape == label.shape == (32, 128, 128)
    assert set(np.unique(label)) == {0, 1}
    assert 0.05 < label.mean() < 0.2
    assert raw[label == 1].mean() < raw[label == 0].mean() - 20  # mitochondria are darker
    assert raw.std() > 10  # textured and noisy, not flat


def test_default_size_volume_reaches_the_requested_fraction() -> None:
    raw, label = generate_volume((64, 256, 256), seed=1, mito_fraction=0.1)
    assert raw.shape == label.shape == (64, 256, 256)
    assert 0.05 < label.mean() < 0.2


def test_zarr_group_has_raw_label_and_lucchi_style_attributes(tmp_path: Path) -> None:
    raw, label = generate_volume((8, 32, 32), seed=2)
    write_volume_zarr(tmp_path / "syn.zarr", raw, label, resolution_nm=(8, 4, 4))
    group = zarr.open_group(str(tmp_path / "syn.zarr"), mode="r")
    assert np.array_equal(group["raw"][...], raw) and np.array_equal(group["label"][...], label)
    assert group["raw"].attrs["resolution_nm"] == [8.0, 4.0, 4.0]
    assert group["label"].attrs["axes"] == ["z", "y", "x"]


def test_training_volumes_are_written_once_where_absent(tmp_path: Path) -> None:
    source = {"raw": f"{tmp_path}/s.zarr/raw", "label": f"{tmp_path}/s.zarr/label"}
    cfg = DataConfig.model_validate({"volumes": [{**source, "synthetic": {"shape": [8, 32, 32], "seed": 2}}]})
    ensure_synthetic_training_data(cfg)
    raw, label = generate_volume((8, 32, 32), seed=2)
    written = open_volume(source["raw"])
    assert np.array_equal(written.read(written.meta.roi)[0], raw)
    assert np.array_equal(open_volume(source["label"]).read(written.meta.roi)[0], label)
    create_volume(source["raw"], written.meta)  # replaced by an empty volume: present, all zeros
    ensure_synthetic_training_data(cfg)  # present: left as it is
    assert not open_volume(source["raw"]).read(written.meta.roi).any()


def test_a_training_volume_has_no_separate_truth() -> None:
    with pytest.raises(ValueError, match="labels are written to `label`"):
        DataConfig.model_validate({"volumes": [{"raw": "a", "label": "b", "synthetic": {"truth": "c"}}]})
