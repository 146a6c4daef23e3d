"""Job configuration: pydantic models per stage (one module each) and loading YAML files with CLI overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.errors import ConfigError

M = TypeVar("M", bound=BaseModel)
REMOVE = object()  # an override value that deletes the field from the file's job (e.g. a new cluster's short forms)


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: the field, the bad value, and what is allowed."""
    lines = [f"invalid configuration in {source}:"]
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        value = problem.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{…}"
        lines.append(f"  - {field}: {problem['msg']} (got {shown})")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML job file, with errors that name the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"configuration file {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"configuration file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {path} must hold a mapping of fields, found {type(data).__name__}")
    return data


def load_config(model: type[M], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> M:
    """Validate a job from an optional YAML file with command-line `overrides` (None values are ignored, REMOVE
    deletes the field; a dotted key such as `optim.time_budget_minutes` sets a field of a section, keeping the
    section's other fields)."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "command-line options"
    for key, value in (overrides or {}).items():
        if value is not None:
            *sections, name = key.split(".")
            section = data
            for part in sections:
                section = section.setdefault(part, {})
                if not isinstance(section, dict):
                    raise ConfigError(f"invalid configuration in {source}: {part} must be a mapping of fields")
            if value is REMOVE:
                section.pop(name, None)
            else:
                section[name] = value
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source)) from err
