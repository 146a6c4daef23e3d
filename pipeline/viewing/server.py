"""A local HTTP server with CORS for output folders, and the Neuroglancer client served offline.

Data goes through `DataServer` (plain files, `.gz` chunks written by cloud-volume served with
`Content-Encoding: gzip`, byte ranges streamed for sharded reads), to the Neuroglancer client's origin only. The
client comes from the `neuroglancer` Python package, which ships the built viewer, so nothing is fetched from the
internet.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from pipeline.viewing.state import Layer

log = logging.getLogger(__name__)

_ENCODINGS = (("", None), (".gz", "gzip"), (".br", "br"))
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_PIECE = 1 << 16
_VIEWER_ORIGINS: set[str] = set()
"""Origins of the Neuroglancer clients this process serves (`start_viewer`): every DataServer answers them."""


def origin_of(url: str) -> str:
    """The origin (`scheme://host:port`) of a URL, as a browser sends it in an `Origin` header."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class _Handler(BaseHTTPRequestHandler):
    """Serves `/<name>/<path>` from the folder registered under `name`; never lists folders.

    Only regular files whose real path (symlinks resolved) lies under their root are served; a bad path is a 4xx,
    never a traceback. CORS headers go only to the origins allowed (the Neuroglancer client), never to `*`.
    """

    roots: dict[str, str] = {}
    origins: set[str] = set()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        log.debug("%s %s", self.address_string(), format % args)

    def end_headers(self) -> None:
        origin = self.headers.get("Origin") if hasattr(self, "headers") else None
        if origin and (origin in self.origins or origin in _VIEWER_ORIGINS):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Allow-Headers", "range, x-requested-with")
            self.send_header("Access-Control-Expose-Headers", "content-range, content-length, content-encoding")
            self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Vary", "Origin")
        super().end_headers()

    def do_OPTIONS(self) -> None:
        self.send_response(HTTPStatus.NO_CONTENT)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _refuse_method(self) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD, OPTIONS")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_method

    def _resolve(self) -> tuple[str, str | None] | None:
        """The file behind the request path and its content encoding, or None.

        Every candidate (the plain name, then its `.gz` and `.br` variants) is resolved to its real path and must be
        a regular file under the root: a symlink or `..` out of the root is refused like a missing file.
        """
        name, _, rest = unquote(urlsplit(self.path).path).lstrip("/").partition("/")
        root = self.roots.get(name)
        if root is None or "\0" in rest:
            return None
        for suffix, encoding in _ENCODINGS:
            path = os.path.realpath(os.path.join(root, rest) + suffix)
            if os.path.commonpath([root, path]) == root and path != root and os.path.isfile(path):
                return path, encoding
        return None

    def _serve(self, body: bool) -> None:
        try:
            found = self._resolve()
        except (OSError, ValueError):
            found = None
        if found is None:
            self.send_error(HTTPStatus.NOT_FOUND, "no such file")
            return
        path, encoding = found
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, after streaming
        except OSError:
            self.send_error(HTTPStatus.FORBIDDEN, "file cannot be read")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            start, end = 0, size - 1
            match = _RANGE.match(self.headers.get("Range", "")) if encoding is None else None
            ranged = bool(match and (match.group(1) or match.group(2)))
            if match and ranged:
                if match.group(1):
                    start, end = int(match.group(1)), int(match.group(2) or size - 1)
                else:
                    start = max(0, size - int(match.group(2)))
                if start >= size or start > end:
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                end = min(end, size - 1)
            self.send_response(HTTPStatus.PARTIAL_CONTENT if ranged else HTTPStatus.OK)
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Accept-Ranges", "bytes")
            is_json = path.endswith((".json", "/info", ".zarray", ".zattrs", ".zgroup"))
            self.send_header("Content-Type", "application/json" if is_json else "application/octet-stream")
            if encoding:
                self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if body:
                self._stream(f, start, end - start + 1)

    def _stream(self, f: BinaryIO, start: int, length: int) -> None:
        """Copy `length` bytes of `f` from `start` to the client in pieces (never the whole file in memory)."""
        f.seek(start)
        try:
            while length > 0:
                piece = f.read(min(_PIECE, length))
                if not piece:
                    break
                self.wfile.write(piece)
                length -= len(piece)
        except ConnectionError:  # the client went away (Neuroglancer cancels chunks it no longer needs)
            log.debug("client %s closed the connection during %s", self.address_string(), self.path)


class DataServer:
    """Serves local folders over HTTP on `host:port` (0: any free port) in a background thread.

    `roots` maps a URL name to a folder: `http://host:port/<name>/...` serves files under that folder. Browsers get
    CORS access only from `origins` (e.g. `http://127.0.0.1:8080`) and from the Neuroglancer clients this process
    serves with `start_viewer`.
    """

    def __init__(self, roots: dict[str, str], host: str = "127.0.0.1", port: int = 0, origins: Iterable[str] = ()):
        self.origins = set(origins)
        handler = type(
            "Handler",
            (_Handler,),
            {"roots": {k: os.path.realpath(v) for k, v in roots.items()}, "origins": self.origins},
        )
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
    url = viewer.get_viewer_url()
    _VIEWER_ORIGINS.add(origin_of(url))
    return viewer, url


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
