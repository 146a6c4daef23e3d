"""The demo job does a real segmentation: Dice >= 0.9 against the synthetic ground truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.cluster
@pytest.mark.slow
def test_demo_job_segments_synthetic_mitochondria(tmp_path: Path) -> None:
    job = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    data = tmp_path / "demo"
    job["input"] = f"{data}/em.zarr/raw"
    job["output"] = [f"{data}/prediction.zarr/probs", f"precomputed://{data}/prediction_precomputed"]
    job["synthetic"].update({"shape": [32, 192, 192], "seed": 11, "truth": f"{data}/em.zarr/label"})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))

    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "segment", str(tmp_path / "job.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "view:" in run.stdout
    for output in job["output"]:
        scores = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "evaluate",
                "--prediction",
                output,
                "--truth",
                job["synthetic"]["truth"],
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        )
        result = json.loads(scores.stdout)
        assert result["dice"] >= 0.9, result
