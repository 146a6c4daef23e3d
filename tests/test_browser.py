"""`mitoseg view` in a real browser: headless Chromium loads and draws every layer of a demo-like output, unsharded
and sharded (zarr v3 sharding, precomputed sharded).

Needs Debian's `chromium` and `chromium-driver` (installed by `.ci/install-chromium`) and the `selenium`
package; skips with the reason otherwise. The screenshot is saved as `neuroglancer.png` in the test's
temporary folder.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--enable-unsafe-swiftshader",
    "--window-size=1400,900",
)
LAYER_STATE_JS = """
const viewer = window.viewer;
if (!viewer) return null;
return {
  ready: viewer.isReady(),
  dimensions: Object.keys(viewer.state.toJSON().dimensions || {}),
  layers: viewer.layerManager.managedLayers.map(l => ({
    name: l.name,
    ready: l.isReady(),
    sources: l.layer ? l.layer.dataSources.map(ds => ds.loadState === undefined ? 'loading'
      : (ds.loadState.error ? 'error: ' + ds.loadState.error.message : 'ok')) : ['no layer'],
  })),
  segmentStatus: Array.from(document.querySelectorAll('.neuroglancer-segment-list-status')).map(e => e.innerText),
  statusMessages: Array.from(document.querySelectorAll('.neuroglancer-status')).map(e => e.innerText),
};
"""
SHOW_ONLY_JS = "window.viewer.layerManager.managedLayers.forEach(l => l.setVisible(l.name === arguments[0]));"
EMPTY_PANEL_GREY = 128
"""What Neuroglancer's cross-section panels show where no layer draws."""


def _executable(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"{' or '.join(names)} not installed: run .ci/install-chromium (Debian chromium and chromium-driver)")


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    chromium = _executable("chromium", "chromium-browser")
    chromedriver = _executable("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(chromedriver))
    browser.set_script_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


def _demo_outputs(out: Path, client: Any, sharded: bool = False) -> tuple[list[str], int]:
    """The demo's layout: its synthetic input (a plain zarr array), probabilities as OME-Zarr and precomputed,
    instances in both formats; outputs with pyramids, instances with meshes and segment properties.

    `sharded`: every output (and its pyramid) in shards of 1 x 2 x 2 chunks, zarr as v3, 8 shards at scale 0."""
    from scipy import ndimage

    from pipeline.synthetic import generate_volume, write_volume_zarr
    from pipeline.viewing.meshes import add_meshes
    from pipeline.viewing.pyramid import add_pyramid
    from pipeline.volumes import VolumeMeta, create_volume, open_volume

    raw, mask = generate_volume((32, 128, 128), seed=3)
    write_volume_zarr(out / "em.zarr", raw, mask, resolution_nm=(5.0, 5.0, 5.0))
    labels, count = ndimage.label(mask)
    smooth = ndimage.gaussian_filter(mask.astype(np.float32), 1.0)
    probs = np.stack([smooth, np.clip(4 * ndimage.gaussian_gradient_magnitude(smooth, 1.0), 0, 1)])
    chunks, shards = ((16, 32, 32), (16, 64, 64)) if sharded else ((16, 64, 64), None)
    meta = VolumeMeta(shape=raw.shape, dtype=np.dtype(np.uint8), chunks=chunks, voxel_size_nm=(5.0, 5.0, 5.0))
    zarr = "zarr3" if sharded else "zarr"
    outputs = [
        f"{zarr}://file://{out}/prediction.zarr/probs",
        f"precomputed://file://{out}/prediction_precomputed",
        f"precomputed://file://{out}/instances",
        f"{zarr}://file://{out}/prediction.zarr/instances",
    ]
    for url in outputs[:2]:
        probs_meta = meta.derive(num_channels=2, shards=shards)
        create_volume(url, probs_meta).write(meta.roi, np.rint(probs * 255).astype(np.uint8))
    for url in outputs[2:]:
        labels_meta = meta.derive(dtype=np.uint64, layer_type="segmentation", shards=shards)
        create_volume(url, labels_meta).write(meta.roi, labels[None].astype(np.uint64))
    for url in outputs:
        assert add_pyramid(client, url, min_chunks_across=1, progress=False).ok
        assert open_volume(url, scale=1).meta.shards == (shards and (16, 64, 64)), url  # its levels sharded too
    for url in outputs[2:]:
        assert add_meshes(client, url, progress=False).ok
    urls = [str(out / "em.zarr" / "raw"), *outputs]
    return urls, int(count)


@contextmanager
def _mitoseg_view(urls: list[str], timeout_s: float = 60) -> Iterator[str]:
    """Run `mitoseg view` and yield the Neuroglancer URL it prints."""
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "view", *urls]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in process.stdout or ():
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                output.append(lines.get(timeout=1))
            except queue.Empty:
                if process.poll() is not None:
                    break
                continue
            match = re.search(r"(http://127\.0\.0\.1:\d+/v/\S+)", output[-1])
            if match:
                yield match.group(1)
                return
        pytest.fail("mitoseg view printed no Neuroglancer URL:\n" + "".join(output))
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_until_loaded(driver: Any, segments: bool = True, timeout_s: float = 90) -> dict[str, Any]:
    """Wait until every layer and data source has loaded (and, with `segments`, a segment list shows)."""
    deadline = time.monotonic() + timeout_s
    state: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        state = driver.execute_script(LAYER_STATE_JS)
        if state and any("error" in s for layer in state["layers"] for s in layer["sources"]):
            return state
        loaded = state and all(layer["ready"] and "loading" not in layer["sources"] for layer in state["layers"])
        if loaded and state["ready"] and (state["segmentStatus"] or not segments):
            return state
        time.sleep(0.5)
    pytest.fail(f"Neuroglancer did not finish loading in {timeout_s} s; last state: {state}")


def _xy_panel(driver: Any, path: Path) -> np.ndarray:
    """A screenshot saved at `path`, cut to the top-left (xy) panel of the 4-panel layout, as (y, x, RGB) ints."""
    from PIL import Image

    driver.save_screenshot(str(path))
    return np.asarray(Image.open(path).convert("RGB"))[60:380, 20:500].astype(int)


def _drawn_alone(driver: Any, name: str, path: Path) -> float:
    """The fraction of the xy panel that layer `name` draws when it is the only one shown (chunks already loaded)."""
    driver.execute_script(SHOW_ONLY_JS, name)
    _wait_until_loaded(driver, segments=False)
    time.sleep(0.5)  # let the frame without the other layers be drawn
    return float((np.abs(_xy_panel(driver, path) - EMPTY_PANEL_GREY).max(axis=-1) > 40).mean())


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
def test_mitoseg_view_loads_every_layer_in_chromium(driver: Any, client: Any, tmp_path: Path, sharded: bool) -> None:
    urls, objects = _demo_outputs(tmp_path / "demo", client, sharded)
    names = ["raw", "probs", "prediction_precomputed", "instances", "instances_2"]
    with _mitoseg_view(urls) as url:
        driver.get(url)
        state = _wait_until_loaded(driver)
        time.sleep(1)  # let the last frame with all chunks be drawn
        screenshot = tmp_path / "neuroglancer.png"
        panel = _xy_panel(driver, screenshot)
        state = driver.execute_script(LAYER_STATE_JS)
        drawn = {name: _drawn_alone(driver, name, tmp_path / f"{name}.png") for name in names[1:]}

    assert [layer["name"] for layer in state["layers"]] == names
    errors = [(layer["name"], s) for layer in state["layers"] for s in layer["sources"] if s != "ok"]
    assert not errors, f"data sources failed to load: {errors}"
    assert not any("rror" in message for message in state["statusMessages"]), state["statusMessages"]
    listed = [re.search(r"(\d+) vis/(\d+) total", text) for text in state["segmentStatus"]]
    assert listed and listed[0] and int(listed[0].group(2)) == objects, state["segmentStatus"]
    assert state["dimensions"] == ["x", "y", "z"], state["dimensions"]
    grey = panel[(np.ptp(panel, axis=-1) < 8)][:, 0]
    assert len(np.unique(grey)) > 50, f"no EM texture in the xy panel; see {screenshot}"
    # every output draws its data: mitochondria cover about a fifth of the panel (an empty one: its axis lines)
    assert all(fraction > 0.05 for fraction in drawn.values()), f"{drawn}; see the layers' png in {tmp_path}"


def _first_bright_column(driver: Any, path: Path) -> int:
    from PIL import Image

    driver.save_screenshot(str(path))
    pixels = np.asarray(Image.open(path).convert("RGB"))
    row = pixels[pixels.shape[0] // 2]
    bright = row.min(axis=-1) > 200  # white, not the yellow of a bounding box
    assert bright.any(), f"no bright voxel drawn in {path}: the layer's data did not load"
    return int(np.argmax(bright))


def test_zarr_and_precomputed_outputs_line_up(driver: Any, tmp_path: Path) -> None:
    from pipeline.viewing.layers import open_layers
    from pipeline.viewing.server import DataServer, start_viewer
    from pipeline.viewing.state import build_state
    from pipeline.volumes import VolumeMeta, create_volume

    shape, offset = (4, 16, 64), (2, 3, 5)
    edge = np.zeros((1, *shape), dtype=np.uint8)
    edge[..., 32:] = 255
    meta = VolumeMeta(shape=shape, dtype=np.dtype(np.uint8), chunks=shape, voxel_size_nm=(10.0, 10.0, 10.0))
    urls = [f"precomputed://file://{tmp_path}/edge", f"zarr://file://{tmp_path}/edge.zarr/edge"]
    for url in urls:
        create_volume(url, meta.derive(voxel_offset=offset)).write(meta.roi, edge)
    layers = open_layers(urls)
    columns = []
    with DataServer({layer.name: layer.url.local_path for layer in layers}) as server:
        for layer in layers:
            state = build_state([layer.served_from(server.url)], layout="xy")
            state |= {
                "crossSectionScale": 0.05,
                "position": [5 + 32, 3 + 8, 2 + 2],
                "showAxisLines": False,
                "showDefaultAnnotations": False,
            }
            _, url = start_viewer(state)
            driver.get(url)
            _wait_until_loaded(driver, segments=False)
            time.sleep(1)
            columns.append(_first_bright_column(driver, tmp_path / f"edge-{layer.name}.png"))
    assert abs(columns[0] - columns[1]) <= 2, f"edge at screen column {columns} (20 px per voxel)"


@pytest.mark.parametrize("mesh_format", ["sharded", "legacy"])
def test_meshes_draw_in_the_3d_view(driver: Any, client: Any, tmp_path: Path, mesh_format: str) -> None:
    """Each object's mesh, of a precomputed layer and of a zarr one (a second source), drawn alone in 3D."""
    from PIL import Image

    from pipeline.viewing.layers import open_layers
    from pipeline.viewing.meshes import add_meshes
    from pipeline.viewing.server import DataServer, start_viewer
    from pipeline.viewing.state import build_state
    from pipeline.volumes import VolumeMeta, create_volume

    labels = np.zeros((32, 64, 64), dtype=np.uint64)
    labels[4:28, 8:40, 8:30], labels[10:20, 30:60, 36:60] = 1, 2
    meta = VolumeMeta(
        shape=labels.shape,
        dtype=labels.dtype,
        chunks=(16, 32, 32),
        voxel_size_nm=(8.0, 4.0, 4.0),
        layer_type="segmentation",
    )
    urls = [f"precomputed://file://{tmp_path}/seg", f"zarr://file://{tmp_path}/seg.zarr/seg"]
    for url in urls:
        create_volume(url, meta).write(meta.roi, labels[None])
        assert add_meshes(client, url, mesh_format=mesh_format, min_chunk_voxels=4, progress=False).ok
    layers = open_layers(urls)
    drawn = {}
    with DataServer({layer.name: layer.url.local_path for layer in layers}) as server:
        for layer in layers:
            state = build_state([layer.served_from(server.url)], layout="3d") | {"showSlices": False}
            _, url = start_viewer(state)
            driver.get(url)
            loaded = _wait_until_loaded(driver)
            errors = [s for one in loaded["layers"] for s in one["sources"] if s != "ok"]
            assert not errors and not any("rror" in m for m in loaded["statusMessages"]), loaded
            time.sleep(2)  # let the meshes arrive and be drawn
            path = tmp_path / f"3d-{layer.name}.png"
            driver.save_screenshot(str(path))
            panel = np.asarray(Image.open(path).convert("RGB")).astype(int)[60:740, 20:1080]  # not the side panel
            box = (panel[..., 0] > 150) & (panel[..., 1] > 150) & (panel[..., 2] < 100)  # the volume's yellow box
            drawn[layer.name] = float(((panel.max(axis=-1) > 60) & ~box).mean())
    assert all(fraction > 0.03 for fraction in drawn.values()), f"{drawn}; see the 3d-*.png in {tmp_path}"
