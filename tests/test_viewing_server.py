"""The data server (CORS, gzip chunks, ranges, no escape from its folders) and `mitoseg view` input checks."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from pipeline.errors import ConfigError, StorageError
from pipeline.viewing.layers import open_layers
from pipeline.viewing.meshes import segment_properties
from pipeline.viewing.server import DataServer, origin_of
from pipeline.volumes import VolumeMeta, create_volume

VIEWER = "http://127.0.0.1:9"  # the origin of the Neuroglancer client the server is told about


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "layer"
    (root / "8_8_8").mkdir(parents=True)
    (root / "info").write_text('{"type": "image"}')
    (root / "8_8_8" / "0-64_0-64_0-64.gz").write_bytes(gzip.compress(b"chunk-bytes"))
    (tmp_path / "secret").write_text("not served")
    (tmp_path / "secret.gz").write_bytes(gzip.compress(b"not served"))
    (tmp_path / "layer.gz").write_bytes(gzip.compress(b"not served either"))
    (root / "link").symlink_to(tmp_path / "secret")
    (root / "hidden.gz").symlink_to(tmp_path / "secret.gz")  # served for `hidden` unless resolved too
    (root / "dir").symlink_to(tmp_path)
    (root / "shard").write_bytes(bytes(range(256)) * 1024)  # 256 KiB: several streamed pieces
    with DataServer({"layer": str(root)}, origins=[VIEWER]) as server:
        yield server.url, root


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), b""


def test_serves_files_with_cors_for_the_viewer_only(served: tuple[str, Path]) -> None:
    base, _ = served
    status, headers, body = _get(f"{base}/layer/info", {"Origin": VIEWER})
    assert status == 200 and json.loads(body) == {"type": "image"}
    assert headers["Access-Control-Allow-Origin"] == VIEWER and headers["Vary"] == "Origin"
    assert headers["Content-Type"] == "application/json"
    status, headers, _ = _get(f"{base}/layer/info", {"Origin": VIEWER}, method="OPTIONS")
    assert status == 204 and headers["Access-Control-Allow-Origin"] == VIEWER
    assert "range" in headers["Access-Control-Allow-Headers"]
    for origin in ("http://evil.example", "http://127.0.0.1:10", "null"):
        status, headers, _ = _get(f"{base}/layer/info", {"Origin": origin})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers, origin
    assert "Access-Control-Allow-Origin" not in _get(f"{base}/layer/info")[1]


def test_a_started_viewer_is_allowed_by_every_data_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import neuroglancer

    from pipeline.viewing.server import start_viewer

    monkeypatch.setattr(neuroglancer, "set_server_bind_address", lambda *a, **k: None)
    monkeypatch.setattr(neuroglancer, "Viewer", lambda: _FakeViewer("http://127.0.0.1:4321/v/abc/"))
    (tmp_path / "info").write_text("{}")
    with DataServer({"layer": str(tmp_path)}) as server:
        assert (
            "Access-Control-Allow-Origin"
            not in _get(f"{server.url}/layer/info", {"Origin": "http://127.0.0.1:4321"})[1]
        )
        start_viewer({})
        headers = _get(f"{server.url}/layer/info", {"Origin": "http://127.0.0.1:4321"})[1]
        assert headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:4321"


class _FakeViewer:
    def __init__(self, url: str) -> None:
        self.url = url

    def set_state(self, state: Any) -> None:
        pass

    def get_viewer_url(self) -> str:
        return self.url


def test_gzip_chunks_are_served_under_their_plain_name(served: tuple[str, Path]) -> None:
    base, _ = served
    status, headers, body = _get(f"{base}/layer/8_8_8/0-64_0-64_0-64")
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == b"chunk-bytes"


def test_byte_ranges(served: tuple[str, Path]) -> None:
    base, _ = served
    status, headers, body = _get(f"{base}/layer/info", {"Range": "bytes=1-6"})
    assert (status, body, headers["Content-Range"]) == (206, b'"type"', "bytes 1-6/17")
    status, _, body = _get(f"{base}/layer/info", {"Range": "bytes=-2"})
    assert (status, body) == (206, b'"}')
    status, headers, _ = _get(f"{base}/layer/info", {"Range": "bytes=100-"})
    assert (status, headers["Content-Range"]) == (416, "bytes */17")


def test_ranges_of_a_large_file_are_streamed_exactly(served: tuple[str, Path]) -> None:
    base, root = served
    data = (root / "shard").read_bytes()
    for first, last in [(0, 0), (70_000, 200_123), (len(data) - 5, len(data) + 100)]:
        status, headers, body = _get(f"{base}/layer/shard", {"Range": f"bytes={first}-{last}"})
        end = min(last, len(data) - 1)
        assert (status, headers["Content-Range"]) == (206, f"bytes {first}-{end}/{len(data)}")
        assert body == data[first : end + 1] and headers["Content-Length"] == str(end - first + 1)
    status, headers, body = _get(f"{base}/layer/shard")
    assert status == 200 and body == data and headers["Accept-Ranges"] == "bytes"
    status, headers, body = _get(f"{base}/layer/shard", {"Range": "bytes=10-19"}, method="HEAD")
    assert (status, headers["Content-Length"], body) == (206, "10", b"")


@pytest.mark.parametrize(
    "path",
    [
        "/layer/missing",
        "/other/info",
        "/layer/../secret",
        "/layer/%2e%2e/secret",
        "/layer/",  # the root itself, and `layer.gz` beside it
        "/layer",
        "/layer/link",  # a symlink out of the root
        "/layer/hidden",  # a `.gz` variant that is a symlink out of the root
        "/layer/dir/secret",  # a folder symlink out of the root
        "/layer/8_8_8",  # folders are never listed
        "/layer/info%00.gz",
        "/layer/%ff%fe",
        "/%00/info",
        "/",
        "//etc/passwd",
        "/layer//etc/passwd",  # an absolute path after the root's name
        "/layer/..%2f..%2fsecret",
    ],
)
def test_missing_unknown_and_escaping_paths_are_404(served: tuple[str, Path], path: str) -> None:
    base, _ = served
    status, _, body = _get(base + path)
    assert status == 404 and b"Traceback" not in body


def test_other_methods_are_refused(served: tuple[str, Path]) -> None:
    base, _ = served
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = _get(f"{base}/layer/info", method=method)
        assert (status, headers["Allow"]) == (405, "GET, HEAD, OPTIONS"), method


def _volume(url: str, layer_type: str = "image") -> str:
    meta = VolumeMeta(
        shape=(8, 16, 16),
        dtype=np.dtype(np.uint64 if layer_type == "segmentation" else np.uint8),
        chunks=(8, 16, 16),
        voxel_size_nm=(8.0, 4.0, 4.0),
        layer_type=layer_type,  # type: ignore[arg-type]
    )
    create_volume(url, meta)
    return url


def test_plain_zarr_array_is_marked(tmp_path: Path) -> None:
    import zarr

    array = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 8, 8), chunks=(4, 8, 8), dtype="uint8")
    array.attrs.update({"resolution_nm": [30, 4, 4], "voxel_offset": [1, 2, 3]})
    (layer,) = open_layers([str(tmp_path / "plain.zarr")])
    assert layer.plain_zarr_names == ("dim_0", "dim_1", "dim_2") and layer.zarr_axes == ("z", "y", "x")
    assert (layer.meta.voxel_size_nm, layer.meta.voxel_offset) == ((30.0, 4.0, 4.0), (1, 2, 3))


@pytest.mark.parametrize(
    ("zarr_format", "kwargs", "names"),
    [
        (2, {}, ("d0", "d1", "d2")),
        (2, {"attributes": {"_ARRAY_DIMENSIONS": ["z", "y", "x"]}}, ("z", "y", "x")),
        (3, {"dimension_names": ["z", "y", "x"]}, ("z", "y", "x")),
    ],
)
def test_neuroglancer_names_of_plain_arrays(
    tmp_path: Path, zarr_format: Literal[2, 3], kwargs: dict[str, Any], names: tuple[str, ...]
) -> None:
    import zarr

    path = str(tmp_path / "plain.zarr")
    zarr.create_array(path, shape=(4, 8, 8), chunks=(4, 8, 8), dtype="uint8", zarr_format=zarr_format, **kwargs)
    (layer,) = open_layers([path])
    assert layer.plain_zarr_names == names


def test_layers_named_and_companions_found(tmp_path: Path) -> None:
    from cloudfiles import CloudFiles

    raw = _volume(f"precomputed://file://{tmp_path}/raw")
    seg = _volume(f"zarr://file://{tmp_path}/out.zarr/raw", "segmentation")
    CloudFiles(f"file://{tmp_path}/out.zarr/raw/meshes/segment_properties").put_json(
        "info", segment_properties({3: 10, 4: 50, 9: 1})
    )
    layers = open_layers([raw, seg])
    assert [layer.name for layer in layers] == ["raw", "raw_2"]
    assert layers[1].mesh_companion == "meshes" and layers[1].segments == (4, 3, 9)
    assert layers[1].zarr_axes == ("c", "z", "y", "x") and not layers[1].plain_zarr_names
    served = layers[1].served_from("http://127.0.0.1:1")
    assert served.source == "zarr://http://127.0.0.1:1/raw_2"
    assert served.extra_sources == ("precomputed://http://127.0.0.1:1/raw_2/meshes",)


@pytest.mark.parametrize(
    ("make", "text", "pattern"),
    [
        (None, "nowhere", "does not exist"),
        ("folder", "folder", "is not a volume: it has neither a precomputed 'info' file nor zarr metadata"),
        ("folder", "precomputed://folder", "has no 'info' file, so it is not a precomputed layer"),
        ("outputs", "out.zarr/nothing", "does not exist"),
        ("group", "group.zarr", "zarr group without OME-Zarr multiscales"),
        ("outputs", "out.zarr", r"it holds volumes but is not one; name them instead: .*out.zarr/probs"),
        ("outputs", "zarr://out.zarr", r"it holds volumes but is not one; name them instead: .*out.zarr/probs"),
    ],
)
def test_bad_input_is_named(tmp_path: Path, make: str | None, text: str, pattern: str) -> None:
    import zarr

    if make == "folder":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "notes.txt").write_text("x")
    elif make == "group":
        zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    elif make == "outputs":
        zarr.open_group(str(tmp_path / "out.zarr"), mode="w")
        _volume(f"zarr://file://{tmp_path}/out.zarr/probs")
    url = text.replace("://", f"://{tmp_path}/") if "://" in text else str(tmp_path / text)
    with pytest.raises(StorageError, match=pattern):
        open_layers([url])


def test_view_command_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["view", str(tmp_path / "nowhere")])
    assert isinstance(result.exception, StorageError)
    raw = _volume(f"precomputed://file://{tmp_path}/raw")
    result = runner.invoke(app, ["view", raw, "--state", str(tmp_path / "state.json")])
    assert isinstance(result.exception, ConfigError) and "are local" in str(result.exception)


def test_state_file_for_volumes_served_over_http(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    _volume(f"precomputed://file://{tmp_path}/raw")
    _volume(f"precomputed://file://{tmp_path}/cells", "segmentation")
    info = json.loads((tmp_path / "cells" / "info").read_text()) | {"segment_properties": "props"}
    (tmp_path / "cells" / "info").write_text(json.dumps(info))
    (tmp_path / "cells" / "props").mkdir()
    (tmp_path / "cells" / "props" / "info").write_text(json.dumps(segment_properties({7: 5, 8: 9})))
    with DataServer({"raw": str(tmp_path / "raw"), "cells": str(tmp_path / "cells")}) as server:
        urls = [f"precomputed://{server.url}/raw", f"precomputed://{server.url}/cells"]
        result = CliRunner().invoke(app, ["view", *urls, "--state", str(tmp_path / "state.json")])
    assert result.exit_code == 0, result.output
    state = json.loads((tmp_path / "state.json").read_text())
    assert [layer["source"] for layer in state["layers"]] == urls
    assert state["layers"][1]["segments"] == ["8", "7"]
    assert state["position"] == [8.0, 8.0, 4.0]


def test_viewer_page_and_volumes_are_served_offline(tmp_path: Path) -> None:
    import re

    from pipeline.viewing.server import serve_layers

    layers = open_layers([_volume(f"precomputed://file://{tmp_path}/raw")])
    with serve_layers(layers) as (url, data_url):
        status, _, page = _get(url)
        script = re.search(rb'src="(main\.[^"]+\.js)"', page)
        assert status == 200 and script, page[:200]
        assert _get(url + script.group(1).decode())[0] == 200
        viewer = origin_of(url)
        status, headers, body = _get(f"{data_url}/raw/info", {"Origin": viewer})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == viewer and b'"scales"' in body
        assert "Access-Control-Allow-Origin" not in _get(f"{data_url}/raw/info", {"Origin": "http://x.example"})[1]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{data_url}/raw/info", timeout=2)
