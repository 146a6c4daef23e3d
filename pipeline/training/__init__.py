"""The training stage: data, losses, distributed set-up and the loop (see `train`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.train import TrainConfig
from pipeline.errors import ConfigError


def load_train_config(
    path: str | Path, *, output: str | Path | None = None, time_budget: float | None = None
) -> TrainConfig:
    """Read and validate a training YAML file, with `output_dir` and `optim.time_budget_minutes` overridden
    when given; ConfigError names the field and the problem."""
    import yaml
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config {path} does not exist: give a YAML file such as configs/lucchi.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"training config {path} is not valid YAML: {err}") from err
    if output is not None:
        data["output_dir"] = str(output)
    if time_budget is not None:
        if not isinstance(data.get("optim", {}), dict):
            raise ConfigError(f"training config {path} is invalid: optim must be a mapping")
        data["optim"] = {**data.get("optim", {}), "time_budget_minutes": time_budget}
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']} (got {e.get('input')!r})"
            for e in err.errors()
        )
        raise ConfigError(f"training config {path} is invalid: {problems}") from err
