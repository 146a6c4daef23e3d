"""Training: the loss goes down, resume is exact, bad input fails before any step, configs validate."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LUCCHI

from pipeline.config import load_config
from pipeline.config.train import TrainConfig
from pipeline.errors import ConfigError, GeometryError
from pipeline.network.checkpoint import load_checkpoint
from pipeline.synthetic import generate_volume, write_volume_zarr
from pipeline.training.loop import train
from pipeline.training.schedule import lr_factor


def tiny_config(tmp_path: Path, **overrides: object) -> TrainConfig:
    """A tiny network on a tiny synthetic volume (generated on first use), fast on 2 cores."""
    data = {
        "volumes": [
            {
                "raw": str(tmp_path / "syn.zarr" / "raw"),
                "label": str(tmp_path / "syn.zarr" / "label"),
                "synthetic": {"shape": [16, 64, 64], "seed": 0},
                "train": {"z": [0, 12]},
                "validation": {"z": [12, 16]},
            }
        ],
        "patch_shape": [8, 32, 32],
    }
    base: dict = {
        "output_dir": str(tmp_path / "run"),
        "num_threads": 1,
        "data": data,
        "network": {"widths": [4, 8], "embedding_dim": 8, "context": [1, 4, 4]},
        "loss": {"contrastive_warmup": 2, "sampling": {"num_points": 64}},
        "optim": {"lr": 0.01, "warmup_iterations": 1, "iterations": 8},
        "augment": {"elastic": 0.0},
        "log_every": 1,
        "checkpoint_every": 2,
        "val_every": 100,
        "val_patch_shape": [8, 32, 32],
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return TrainConfig.model_validate(base)


def _losses(run: Path) -> list[float]:
    with (run / "train.csv").open() as handle:
        return [float(row["seg"]) for row in csv.DictReader(handle)]


def test_a_few_steps_lower_the_loss(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path, optim={"iterations": 30, "min_lr": 0.01}, augment={"flip": False, "rot90": False, "intensity": 0.0}
    )
    result = train(cfg)
    losses = _losses(tmp_path / "run")
    assert result.step == 30 and len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert result.best_jaccard is not None and (tmp_path / "run" / "best.pt").exists()


# Tests that compare runs bit for bit train on the CPU: CUDA kernels (cuDNN convolutions' backward passes) are
# not deterministic, so on a GPU the same run differs in the last bits.
def test_resume_continues_the_same_schedule_exactly(tmp_path: Path) -> None:
    straight = train(tiny_config(tmp_path / "a", device="cpu"))
    cfg_b = tiny_config(tmp_path / "b", device="cpu")
    first = train(cfg_b, max_iterations=4)
    assert first.step == 4
    payload = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)
    assert payload["step"] == 4
    assert payload["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg_b.optim.lr * lr_factor(3, cfg_b))
    resumed = train(cfg_b, resume=True)
    assert resumed.step == 8
    for key, value in straight.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert _losses(tmp_path / "a" / "run") == _losses(tmp_path / "b" / "run")


def test_init_from_starts_a_fresh_schedule_from_saved_weights(tmp_path: Path) -> None:
    from pipeline.network.checkpoint import export_checkpoint

    source = train(tiny_config(tmp_path / "a"), max_iterations=4)
    export_checkpoint(source.last_checkpoint, tmp_path / "small.pt")  # no projection head: still a valid start
    cfg = tiny_config(tmp_path / "b", init_from=str(tmp_path / "small.pt"), optim={"lr": 1e-12, "min_lr": 1e-12})
    tuned = train(cfg, max_iterations=1)
    assert tuned.step == 1  # the schedule starts at 0, not at the source's step
    for key, value in source.network.state_dict().items():
        if not key.startswith("projection.") and value.is_floating_point() and "running" not in key:
            torch.testing.assert_close(tuned.network.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
    other = tiny_config(tmp_path / "c", init_from=str(tmp_path / "small.pt"), network={"widths": [4, 8, 8]})
    with pytest.raises(ConfigError, match="another network"):
        train(other)


def test_weight_average_is_checkpointed_and_resumes_exactly(tmp_path: Path) -> None:
    straight = train(tiny_config(tmp_path / "a", optim={"ema_decay": 0.8}, device="cpu"))
    cfg = tiny_config(tmp_path / "b", optim={"ema_decay": 0.8}, device="cpu")
    train(cfg, max_iterations=4)
    resumed = train(cfg, resume=True)
    saved = [torch.load(tmp_path / run / "run" / "last.pt", weights_only=True) for run in ("a", "b")]
    for key, value in straight.network.state_dict().items():
        torch.testing.assert_close(saved[0]["train_state_dict"][key], value, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(resumed.network.state_dict()[key], value, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(saved[1]["state_dict"][key], saved[0]["state_dict"][key], rtol=0, atol=0, msg=key)
    # the stored (inference) weights are the average, not the last step's weights, batch-norm statistics included
    moved = [
        k
        for k, v in saved[0]["state_dict"].items()
        if v.is_floating_point() and not v.equal(saved[0]["train_state_dict"][k])
    ]
    assert any("running_mean" in k for k in moved) and any(k.endswith("weight") for k in moved)
    assert load_checkpoint(tmp_path / "a" / "run" / "last.pt").metadata["weight_average"] == {"ema_decay": 0.8}
    train(tiny_config(tmp_path / "c"), max_iterations=2)
    with pytest.raises(ConfigError, match="without ema_decay"):
        train(tiny_config(tmp_path / "c", optim={"ema_decay": 0.8}), resume=True)


def test_weight_average_is_an_exponential_moving_average() -> None:
    from pipeline.network.model import build_network
    from pipeline.training.schedule import make_average

    cfg = tiny_config(Path("unused"), optim={"ema_decay": 0.75})
    network = build_network(cfg.network)
    average = make_average(network, cfg)
    before = {k: v.clone() for k, v in average.module.state_dict().items()}
    with torch.no_grad():
        for tensor in [*network.parameters(), *(b for b in network.buffers() if b.is_floating_point())]:
            tensor.add_(1.0)
    average.update_parameters(network)  # first update copies
    average.update_parameters(network)
    for key, value in average.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, before[key] + 1.0, msg=key)
    with torch.no_grad():
        for tensor in [*network.parameters(), *(b for b in network.buffers() if b.is_floating_point())]:
            tensor.add_(4.0)
    average.update_parameters(network)
    for key, value in average.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, before[key] + 1.0 + 0.25 * 4.0, msg=key)


def test_resume_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        train(tiny_config(tmp_path), resume=True)


def test_label_shape_mismatch_fails_before_any_step(tmp_path: Path) -> None:
    raw, label = generate_volume((16, 64, 64), seed=0)
    write_volume_zarr(tmp_path / "a.zarr", raw, label)
    write_volume_zarr(tmp_path / "b.zarr", raw[:, :, :60], label[:, :, :60])
    cfg = tiny_config(tmp_path)
    cfg.data.volumes[0].raw, cfg.data.volumes[0].label = str(tmp_path / "a.zarr/raw"), str(tmp_path / "b.zarr/label")
    cfg.data.volumes[0].synthetic = None
    with pytest.raises(GeometryError, match=r"label volume .* has shape \(16, 64, 60\)"):
        train(cfg)
    assert not (tmp_path / "run" / "train.csv").exists() and not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("data: {volumes: []}\n", "data.volumes"),
        ("data: {volumes: [{raw: a, label: b}]}\nbogus: 1\n", "bogus"),
        ("data: {volumes: [{raw: a, label: b}], patch_shape: [8, 30, 30]}\n", "size divisor"),
        ("data: {volumes: [{raw: a, label: b, train: {z: [5, 2]}}]}\n", "start < stop"),
        ("optim: {lr: -1}\ndata: {volumes: [{raw: a, label: b}]}\n", "optim.lr"),
        ("[unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_is_a_config_error_naming_the_field(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(TrainConfig, path)


def test_region_outside_the_volume_fails_before_any_step(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        data={"volumes": [{**tiny_config(tmp_path).data.volumes[0].model_dump(), "validation": {"z": [12, 40]}}]},
    )
    with pytest.raises(GeometryError, match="outside the volume"):
        train(cfg)
    assert not (tmp_path / "run" / "train.csv").exists()


@pytest.mark.skipif(not LUCCHI.exists(), reason="Lucchi data absent (../shared/data/lucchi): a fresh clone")
def test_lucchi_config_names_matching_volumes_and_a_disjoint_split(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.training.data import open_pair

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = load_config(TrainConfig, "configs/lucchi.yaml")
    for source in cfg.data.volumes:
        raw, _ = open_pair(source.raw, source.label)
        assert raw.meta.shape == (165, 768, 1024)
        assert source.train.z[1] <= source.validation.z[0]  # held-out slices never trained on


def test_loader_workers_change_nothing_but_speed_and_snapshots_are_kept(tmp_path: Path) -> None:
    inline = train(tiny_config(tmp_path / "a", optim={"iterations": 6}, device="cpu"))
    workers = train(
        tiny_config(tmp_path / "b", optim={"iterations": 6}, data={"loader_workers": 2}, snapshot_every=3, device="cpu")
    )
    for key, value in inline.network.state_dict().items():
        torch.testing.assert_close(workers.network.state_dict()[key], value, rtol=0, atol=0, msg=key)
    run = tmp_path / "b" / "run"
    assert sorted(p.name for p in run.glob("step_*.pt")) == ["step_0000003.pt", "step_0000006.pt"]
    assert torch.load(run / "step_0000003.pt", weights_only=True)["step"] == 3
    assert not list((tmp_path / "a" / "run").glob("step_*.pt"))


def test_time_budget_overrides_only_the_budget(tmp_path: Path) -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / "lucchi.yaml"
    plain, limited = load_config(TrainConfig, path), load_config(TrainConfig, path, {"optim.time_budget_minutes": 7.5})
    assert limited.optim.time_budget_minutes == 7.5 != plain.optim.time_budget_minutes
    assert limited.optim.model_copy(update={"time_budget_minutes": None}) == plain.optim.model_copy(
        update={"time_budget_minutes": None}
    )
    (tmp_path / "bad.yaml").write_text("data: {volumes: [{raw: a, label: b}]}\n")
    with pytest.raises(ConfigError, match="optim.time_budget_minutes"):
        load_config(TrainConfig, tmp_path / "bad.yaml", {"optim.time_budget_minutes": -1})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_asked_for_without_a_gpu_fails_before_any_step(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        train(tiny_config(tmp_path, device="cuda"))
    assert not (tmp_path / "run" / "train.csv").exists()
