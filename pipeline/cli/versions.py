"""`mitoseg versions list|switch|prune`: the stored versions of a reprocessed output, and which one is current."""

from __future__ import annotations

import time
from typing import Annotated

import typer

app = typer.Typer(
    name="versions",
    help="List, switch and prune the versions of an output (a changed job writes a new version beside the last).",
    no_args_is_help=True,
)

Output = Annotated[str, typer.Argument(help="Output volume URL or local path, as the job names it.")]


@app.command("list")
def list_(output: Output) -> None:
    """Every stored version: name, whether it is current and complete, its network and when it was made."""
    from pipeline.versions import list_versions

    for version in list_versions(output):
        made = version.provenance.get("created_at")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(made))) if made else "-"
        typer.echo(
            f"{'*' if version.current else ' '} {version.name:<18} "
            f"{'complete' if version.complete else 'INCOMPLETE':<10} "
            f"checkpoint {str(version.provenance.get('checkpoint_hash', '-'))[:12]:<12} made {when}  {version.location}"
        )


@app.command()
def switch(
    output: Output,
    version: Annotated[str, typer.Argument(help="Version name from `mitoseg versions list` (or 'original').")],
) -> None:
    """Make another complete version current (e.g. go back to the previous network's output)."""
    from pipeline.errors import BlockFailedError, ConfigError
    from pipeline.versions import list_versions
    from pipeline.versions import switch as switch_to
    from pipeline.volumes import parse_volume_url

    found = {v.name: v for v in list_versions(output)}
    if version not in found:
        raise ConfigError(f"{output} has no version {version!r}; it has: {', '.join(found) or 'none'}")
    if not found[version].complete:
        raise BlockFailedError(f"version {version} of {output} is incomplete: finish it with its segment job first")
    switch_to(parse_volume_url(output).location, version)
    typer.echo(f"{output}: current version is now {version}")


@app.command()
def prune(
    output: Output,
    keep: Annotated[int, typer.Option("--keep", help="Complete versions to keep, the current one included.")] = 2,
) -> None:
    """Delete old complete versions beyond the newest KEEP (never the current one, the original or unfinished ones)."""
    from pipeline.versions import prune as prune_versions

    deleted = prune_versions(output, keep)
    for version in deleted:
        typer.echo(f"deleted version {version.name} ({version.location})")
    typer.echo(f"{output}: {len(deleted)} version(s) deleted")
