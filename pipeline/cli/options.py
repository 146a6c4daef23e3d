"""Pieces shared by the commands' options: the defaults that `--help` shows come from the config models."""

from __future__ import annotations

from pydantic import BaseModel


def config_default(model: type[BaseModel], path: str) -> str:
    """The default of a config field as `--help` shows it (`cluster.workers` reads nested models; Z,Y,X triples)."""
    first, _, rest = path.partition(".")
    value = model.model_fields[first].get_default(call_default_factory=True)
    for name in rest.split(".") if rest else []:
        value = getattr(value, name)
    if isinstance(value, tuple | list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(getattr(value, "kind", value))
