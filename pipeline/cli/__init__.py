"""The `mitoseg` command line: thin commands that parse, load the config, and call the library."""

from __future__ import annotations

import logging
import os
import sys

import typer

from pipeline.errors import MitosegError
from pipeline.storage import configure, redact, redact_logs

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


def _log_handler() -> logging.Handler:
    """rich's handler on a terminal; elsewhere (a batch log, a pipe) one plain, unwrapped line per record on
    stderr, with time and level: rich would wrap every line at 80 columns there."""
    from rich import get_console

    if get_console().is_terminal:
        from rich.logging import RichHandler

        return RichHandler(show_path=False, rich_tracebacks=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    _version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[_log_handler()])
    redact_logs()  # no URL credentials in log lines
    configure()  # object storage as the environment says (pipeline.storage)
    # Dask reads this when distributed is first imported (here and in worker processes, which inherit it).
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "debug" if verbose else "warning")
    for noisy in ("distributed", "urllib3", "numcodecs"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _register() -> None:
    from pipeline.cli.checkpoint import app as checkpoint
    from pipeline.cli.crossval import crossval
    from pipeline.cli.evaluate import evaluate
    from pipeline.cli.examples import examples
    from pipeline.cli.instances import instances
    from pipeline.cli.plan import plan
    from pipeline.cli.segment import segment
    from pipeline.cli.train import train
    from pipeline.cli.versions import app as versions
    from pipeline.cli.view import view

    for name, command in (
        ("segment", segment),
        ("plan", plan),
        ("instances", instances),
        ("train", train),
        ("crossval", crossval),
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
        code = app(standalone_mode=False)  # typer.Exit(code) arrives here as the return value, not raised
    except MitosegError as err:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {redact(str(err))}", highlight=False)
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
    if isinstance(code, int) and code:
        sys.exit(code)
