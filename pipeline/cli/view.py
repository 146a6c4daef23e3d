"""`mitoseg view URL...`: open outputs in Neuroglancer, served from this machine, or write the state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def view(
    urls: Annotated[
        list[str],
        typer.Argument(
            help="Volumes to show, e.g. data/em.zarr/raw out.zarr/probs precomputed://file:///out/instances."
        ),
    ],
    state: Annotated[
        Path | None,
        typer.Option(
            "--state",
            help="Write the Neuroglancer state JSON here instead of serving (for gs://, s3:// or https:// volumes).",
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="Port of the viewer page on 127.0.0.1 (0: any free port).")] = 0,
    data_port: Annotated[int, typer.Option(help="Port that serves the local volumes (0: any free port).")] = 0,
) -> None:
    """Show volumes in Neuroglancer: EM image in grey, probabilities in colour, instances with meshes.

    The viewer and the volumes are served on 127.0.0.1 only; on a remote machine, fix --port and --data-port
    and forward both (ssh -L).
    """
    import threading

    from pipeline.errors import ConfigError
    from pipeline.viewing.layers import open_layers
    from pipeline.viewing.server import serve_layers
    from pipeline.viewing.state import build_state

    layers = open_layers(urls)
    if state is not None:
        local = [str(layer.url) for layer in layers if layer.url.is_local]
        if local:
            raise ConfigError(
                f"--state needs volumes that any Neuroglancer can reach (gs://, s3://, https://); {', '.join(local)} "
                "are local: view them without --state, which serves them from this machine"
            )
        state.write_text(json.dumps(build_state(layers), indent=2))
        typer.echo(f"wrote the Neuroglancer state to {state}; paste it into any Neuroglancer (Edit JSON state)")
        return
    with serve_layers(layers, port=port, data_port=data_port) as (url, data_url):
        typer.echo(f"Neuroglancer: {url}")
        typer.echo(f"volumes served at {data_url}; press Ctrl-C to stop")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            typer.echo("stopped")
