"""A local HTTP server with CORS for output folders, and the Neuroglancer client served offline.

Data goes through `DataServer` (plain files, `.gz` chunks written by cloud-volume served with
`Content-Encoding: gzip`, byte ranges for sharded reads). The client comes from the `neuroglancer`
Python package, which ships the built viewer, so nothing is fetched from the internet.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from pipeline.viewing.state import Layer

log = logging.getLogger(__name__)

_ENCODINGS = ((".gz", "gzip"), (".br", "br"))
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    """Serves `/<name>/<path>` from the folder registered under `name`; never lists folders."""

    roots: dict[str, str] = {}

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        log.debug("%s %s", self.address_string(), format % args)

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "range, x-requested-with")
        self.send_header("Access-Control-Expose-Headers", "content-range, content-length, content-encoding")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        super().end_headers()

    def do_OPTIONS(self) -> None:
        self.send_response(HTTPStatus.NO_CONTENT)
        self.end_headers()

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _resolve(self) -> tuple[str, str | None] | None:
        """The file behind the request path and its content encoding, or None."""
        name, _, rest = unquote(urlsplit(self.path).path).lstrip("/").partition("/")
        root = self.roots.get(name)
        if root is None:
            return None
        path = os.path.realpath(os.path.join(root, rest))
        if os.path.commonpath([root, path]) != root:
            return None
        if os.path.isfile(path):
            return path, None
        for suffix, encoding in _ENCODINGS:
            if os.path.isfile(path + suffix):
                return path + suffix, encoding
        return None

    def _serve(self, body: bool) -> None:
        found = self._resolve()
        if found is None:
            self.send_error(HTTPStatus.NOT_FOUND, "no such file")
            return
        path, encoding = found
        with open(path, "rb") as f:
            data = f.read()
        status = HTTPStatus.OK
        match = _RANGE.match(self.headers.get("Range", "")) if encoding is None else None
        if match and (match.group(1) or match.group(2)):
            size = len(data)
            if match.group(1):
                start, end = int(match.group(1)), int(match.group(2) or size - 1)
            else:
                start, end = max(0, size - int(match.group(2))), size - 1
            if start >= size or start > end:
                self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                return
            end = min(end, size - 1)
            data = data[start : end + 1]
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        is_json = path.endswith((".json", "/info", ".zarray", ".zattrs", ".zgroup"))
        self.send_header("Content-Type", "application/json" if is_json else "application/octet-stream")
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


class DataServer:
    """Serves local folders over HTTP on `host:port` (0: any free port) in a background thread.

    `roots` maps a URL name to a folder: `http://host:port/<name>/...` serves files under that folder.
    """

    def __init__(self, roots: dict[str, str], host: str = "127.0.0.1", port: int = 0):
        handler = type("Handler", (_Handler,), {"roots": {k: os.path.realpath(v) for k, v in roots.items()}})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="mitoseg-data-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> DataServer:
        self._thread.start()
        log.info("serving data at %s", self.url)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> DataServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_viewer(state: dict[str, Any], host: str = "127.0.0.1", port: int = 0) -> tuple[Any, str]:
    """Start the Neuroglancer client server of the `neuroglancer` package with `state`; return (viewer, URL)."""
    import neuroglancer

    neuroglancer.set_server_bind_address(host, bind_port=port)
    viewer = neuroglancer.Viewer()
    viewer.set_state(neuroglancer.ViewerState(state))
    return viewer, viewer.get_viewer_url()


@contextmanager
def serve_layers(layers: list[Layer], port: int = 0, data_port: int = 0) -> Iterator[tuple[str, str]]:
    """Serve the local volumes of `layers` and a Neuroglancer page showing all of them, on 127.0.0.1.

    Yields (viewer page URL, data server URL); both servers stop when the block ends.
    """
    import neuroglancer

    from pipeline.viewing.state import build_state

    roots = {layer.name: layer.url.local_path for layer in layers if layer.url.is_local}
    with DataServer(roots, port=data_port) as server:
        _, url = start_viewer(build_state([layer.served_from(server.url) for layer in layers]), port=port)
        try:
            yield url, server.url
        finally:
            neuroglancer.stop()
