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
from pipeline.viewing.server import DataServer
from pipeline.volumes import VolumeMeta, create_volume


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "layer"
    (root / "8_8_8").mkdir(parents=True)
    (root / "info").write_text('{"type": "image"}')
    (root / "8_8_8" / "0-64_0-64_0-64.gz").write_bytes(gzip.compress(b"chunk-bytes"))
    (tmp_path / "secret").write_text("not served")
    with DataServer({"layer": str(root)}) as server:
        yield server.url, root


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), b""


def test_serves_files_with_cors(served: tuple[str, Path]) -> None:
    base, _ = served
    status, headers, body = _get(f"{base}/layer/info")
    assert status == 200 and json.loads(body) == {"type": "image"}
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Content-Type"] == "application/json"
    status, headers, _ = _get(f"{base}/layer/info", method="OPTIONS")
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"


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
    assert _get(f"{base}/layer/info", {"Range": "bytes=100-"})[0] == 416


@pytest.mark.parametrize(
    "path", ["/layer/missing", "/other/info", "/layer/../secret", "/layer/%2e%2e/secret", "/layer/"]
)
def test_missing_unknown_and_escaping_paths_are_404(served: tuple[str, Path], path: str) -> None:
    base, _ = served
    assert _get(base + path)[0] == 404


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
        status, headers, body = _get(f"{data_url}/raw/info")
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*" and b'"scales"' in body
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{data_url}/raw/info", timeout=2)
