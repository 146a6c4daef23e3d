"""`mitoseg examples`: list the bundled job files, or copy them somewhere to run or edit.

They are the repository's `configs/`, shipped in the package as `pipeline/examples` (a link to `configs/` in a
checkout, so both always agree).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def bundled_examples() -> dict[str, Path]:
    """The bundled job files by name (`demo` is demo.yaml)."""
    return {path.stem: path for path in sorted(EXAMPLES.glob("*.yaml"))}


def first_comment(path: Path) -> str:
    """The first comment line of a job file, without its `#`: what the job is for."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def examples(
    name: Annotated[str | None, typer.Argument(help="Example to copy (e.g. demo); none lists them all.")] = None,
    to: Annotated[
        Path | None, typer.Option("--to", help="Folder to copy into (created); with no NAME, copy every example.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite files that already exist there.")] = False,
) -> None:
    """List the bundled example jobs, or copy one (or all, with --to and no NAME) to run or edit."""
    bundled = bundled_examples()
    if name is None and to is None:
        width = max(map(len, bundled), default=0)
        for stem, path in bundled.items():
            typer.echo(f"{stem:<{width}}  {first_comment(path)}")
        return
    if name is not None and name.removesuffix(".yaml") not in bundled:
        raise ConfigError(f"no example is named {name!r}; the examples are {', '.join(bundled)}")
    chosen = [bundled[name.removesuffix(".yaml")]] if name is not None else list(bundled.values())
    folder = to if to is not None else Path()
    targets = [folder / path.name for path in chosen]
    existing = [str(target) for target in targets if target.exists()]
    if existing and not force:
        raise ConfigError(f"{', '.join(existing)} already exist(s); pass --force to overwrite, or choose --to DIR")
    folder.mkdir(parents=True, exist_ok=True)
    for path, target in zip(chosen, targets, strict=True):
        shutil.copyfile(path, target)
        typer.echo(f"wrote {target}")
