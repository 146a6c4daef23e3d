"""Two-process torchrun on CPU (gloo): both ranks end with identical weights and weight averages."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.config.train import TrainConfig

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from pipeline.config.train import TrainConfig
    from pipeline.training.loop import train

    cfg = TrainConfig.model_validate_json(open(sys.argv[1]).read())
    result = train(cfg)
    weights = {"network": result.network.state_dict(), "average": result.average.state_dict()}
    torch.save(weights, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
    """
)


def test_two_rank_torchrun_keeps_weights_identical(tmp_path: Path) -> None:
    volume = {
        "raw": str(tmp_path / "syn.zarr/raw"),
        "label": str(tmp_path / "syn.zarr/label"),
        "synthetic": {"shape": [16, 64, 64], "seed": 0},
        "train": {"z": [0, 12]},
        "validation": {"z": [12, 16]},
    }
    cfg = TrainConfig.model_validate(
        {
            "output_dir": str(tmp_path / "run"),
            "device": "cpu",  # gloo on the CPU even where a GPU is present: two ranks cannot share one under NCCL
            "num_threads": 1,
            "data": {"volumes": [volume], "patch_shape": [8, 32, 32]},
            "network": {"widths": [4, 8], "embedding_dim": 8, "context": [1, 4, 4]},
            "loss": {"contrastive_warmup": 2, "sampling": {"num_points": 64}},
            "optim": {"lr": 0.01, "warmup_iterations": 1, "iterations": 4, "ema_decay": 0.5},
            "checkpoint_every": 2,
            "val_every": 100,
            "val_patch_shape": [8, 32, 32],
        }
    )
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    (tmp_path / "run_rank.py").write_text(SCRIPT)
    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(tmp_path / "run_rank.py"),
            str(tmp_path / "cfg.json"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    initial = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert initial["step"] == 4 and initial["metadata"].count('"world_size": 2') == 1
    for part in ("network", "average"):  # batch-norm statistics of both averaged over ranks at the checkpoint
        for key, value in rank0[part].items():
            torch.testing.assert_close(rank1[part][key], value, rtol=0, atol=0, msg=f"{part} {key}")


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.errors import ConfigError
    from pipeline.training import distributed

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="LOCAL_RANK 1 but this node has 1 GPU"):
        distributed.setup()
