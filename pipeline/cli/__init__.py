"""The `mitoseg` command line: thin commands that parse, load the config, and call the library."""

from __future__ import annotations

import logging
import os
import sys

import typer

from pipeline.errors import MitosegError

app = typer.Typer(
    name="mitoseg",
    help="Mitochondria segmentation of EM volumes of any size, block by block on Dask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"mitoseg {version('mitoseg')}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    _version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )
    # Dask reads this when distributed is first imported (here and in worker processes, which inherit it).
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "debug" if verbose else "warning")
    for noisy in ("distributed", "urllib3", "numcodecs"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _register() -> None:
    from pipeline.cli.checkpoint import app as checkpoint
    from pipeline.cli.evaluate import evaluate
    from pipeline.cli.examples import examples
    from pipeline.cli.instances import instances
    from pipeline.cli.segment import segment
    from pipeline.cli.train import train
    from pipeline.cli.versions import app as versions
    from pipeline.cli.view import view

    for name, command in (
        ("segment", segment),
        ("instances", instances),
        ("train", train),
        ("evaluate", evaluate),
        ("view", view),
        ("examples", examples),
    ):
        app.command(name)(command)
    app.add_typer(checkpoint)
    app.add_typer(versions)


_register()


def main() -> None:
    """Entry point of the console script: user errors print one clear message and exit with status 2."""
    try:
        app(standalone_mode=False)
    except MitosegError as err:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)
    except typer.Exit as stop:
        sys.exit(stop.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except typer.TyperException as err:  # usage errors (bad option values) arrive here in non-standalone mode
        if not hasattr(err, "show"):
            raise
        err.show()
        sys.exit(getattr(err, "exit_code", 2))
