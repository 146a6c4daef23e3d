"""The Neuroglancer state: sources, dimensions, start position and layer styles, checked by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.viewing import view_command
from pipeline.viewing.state import Layer, build_state, neuroglancer_source
from pipeline.volumes import VolumeMeta, parse_volume_url

RAW = VolumeMeta(
    shape=(40, 100, 200), dtype=np.dtype(np.uint8), chunks=(8, 64, 64), voxel_size_nm=(30.0, 8.0, 4.0),
    voxel_offset=(10, 20, 30),
)  # fmt: skip
PROBS = RAW.derive(num_channels=2)
LABELS = RAW.derive(dtype=np.uint64, layer_type="segmentation")


@pytest.mark.parametrize(
    ("url", "base", "expected"),
    [
        ("precomputed://file:///data/raw", "http://127.0.0.1:9000/raw", "precomputed://http://127.0.0.1:9000/raw"),
        ("zarr://file:///data/v.zarr/probs", "http://127.0.0.1:9000/probs/", "zarr://http://127.0.0.1:9000/probs"),
        ("zarr2://gs://bucket/v.zarr/probs", None, "zarr2://gs://bucket/v.zarr/probs"),
        ("precomputed://s3://bucket/seg", None, "precomputed://s3://bucket/seg"),
    ],
)
def test_neuroglancer_source(url: str, base: str | None, expected: str) -> None:
    assert neuroglancer_source(parse_volume_url(url), base) == expected


def test_local_source_needs_a_server() -> None:
    with pytest.raises(ValueError, match="served"):
        neuroglancer_source(parse_volume_url("precomputed://file:///data/raw"))


def test_state_dimensions_position_and_layers() -> None:
    layers = [
        Layer("raw", parse_volume_url("precomputed://http://h/raw"), RAW),
        Layer("probs", parse_volume_url("zarr://http://h/probs"), PROBS, zarr_axes=("c", "z", "y", "x")),
        Layer(
            "cells",
            parse_volume_url("zarr://http://h/cells"),
            LABELS,
            zarr_axes=("c", "z", "y", "x"),
            mesh_companion="meshes",
            segments=(5, 2),
        ),
    ]
    state = build_state(layers)
    json.dumps(state)

    assert state["dimensions"] == {"x": [4e-9, "m"], "y": [8e-9, "m"], "z": [30e-9, "m"]}
    assert state["position"] == [30 + 100, 20 + 50, 10 + 20]
    raw, probs, cells = state["layers"]
    assert raw == {"type": "image", "name": "raw", "source": "precomputed://http://h/raw"}
    assert probs["source"]["transform"]["outputDimensions"] == {
        "c^": [1, ""],
        "z": [30e-9, "m"],
        "y": [8e-9, "m"],
        "x": [4e-9, "m"],
    }
    assert "matrix" not in probs["source"]["transform"] and "inputDimensions" not in probs["source"]["transform"]
    assert "channel=[0]" in probs["shader"] and "range=[0, 255]" in probs["shader"]
    assert probs["blend"] == "additive"
    assert cells["type"] == "segmentation" and cells["segments"] == ["5", "2"]
    assert cells["source"][1] == "precomputed://http://h/cells/meshes"
    assert list(cells["source"][0]["transform"]["outputDimensions"]) == ["c'", "z", "y", "x"]
    assert state["selectedLayer"] == {"layer": "cells", "visible": True}


def test_plain_zarr_array_gets_voxel_size_and_offset_from_the_transform() -> None:
    url = parse_volume_url("zarr://http://h/raw")
    layer = Layer("raw", url, RAW, zarr_axes=("z", "y", "x"), plain_zarr_names=("d0", "d1", "d2"))
    transform = build_state([layer])["layers"][0]["source"]["transform"]
    assert transform["matrix"] == [[1, 0, 0, 10], [0, 1, 0, 20], [0, 0, 1, 30]]
    assert transform["outputDimensions"] == {"z": [30e-9, "m"], "y": [8e-9, "m"], "x": [4e-9, "m"]}
    assert transform["inputDimensions"] == {"d0": [30e-9, "m"], "d1": [8e-9, "m"], "d2": [4e-9, "m"]}


def test_single_channel_float_overlay() -> None:
    probs = RAW.derive(dtype=np.float32)
    raw, p = parse_volume_url("precomputed://http://h/raw"), parse_volume_url("precomputed://http://h/p")
    state = build_state([Layer("raw", raw, RAW), Layer("p", p, probs)])
    shader = state["layers"][1]["shader"]
    assert "channel" not in shader and "range=[0, 1]" in shader


def test_state_needs_a_layer() -> None:
    with pytest.raises(ValueError, match="at least one layer"):
        build_state([])


def test_view_command_quotes_paths() -> None:
    assert view_command(["out/a b.zarr/probs", "precomputed://gs://b/seg"]) == (
        "mitoseg view 'out/a b.zarr/probs' precomputed://gs://b/seg"
    )
