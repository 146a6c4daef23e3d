"""An installed wheel works outside the checkout: its examples, its shipped checkpoints, the demo end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "pipeline", "workers", "configs")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the working tree, installed into its own folder (first on PYTHONPATH, so the
    checkout's editable install is not what gets imported)."""
    tmp = tmp_path_factory.mktemp("wheel")
    (tmp / "src").mkdir()
    for name in SOURCES:  # a copy, so the build leaves nothing in the checkout
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp / "src" / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, tmp / "src" / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", tmp / "src"], check=True)
    (wheel,) = (tmp / "dist").glob("mitoseg-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp / "site", wheel], check=True)
    return tmp / "site"


def mitoseg(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([site / "bin" / "mitoseg", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.slow
def test_the_installed_package_is_the_one_imported(installed: Path, tmp_path: Path) -> None:
    code = "import pipeline; print(pipeline.__file__)"
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert Path(out.stdout.strip()).is_relative_to(installed), out.stdout + out.stderr
    version = mitoseg(installed, "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("mitoseg "), version.stderr


@pytest.mark.slow
def test_shipped_checkpoints_and_examples_are_found_by_name(installed: Path, tmp_path: Path) -> None:
    info = mitoseg(installed, "checkpoint", "info", "lucchi", "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert Path(json.loads(info.stdout)["path"]).is_relative_to(installed)
    listed = mitoseg(installed, "examples", cwd=tmp_path)
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")), listed.stderr


@pytest.mark.slow
@pytest.mark.cluster
def test_the_demo_runs_from_the_wheel_without_a_checkpoint_option(installed: Path, tmp_path: Path) -> None:
    copied = mitoseg(installed, "examples", "demo", "--to", ".", cwd=tmp_path)
    assert copied.returncode == 0 and (tmp_path / "demo.yaml").is_file(), copied.stderr
    run = mitoseg(installed, "segment", "demo.yaml", "--workers", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "segment: 4 block(s) computed" in run.stdout and "view:" in run.stdout
    for output in ("em.zarr/raw", "prediction.zarr/probs", "prediction_precomputed/info", "mitochondria.csv"):
        assert (tmp_path / "data" / "demo" / output).exists(), output


def test_constraints_pin_every_requirement_to_a_version_setup_cfg_allows() -> None:
    """constraints.txt (what `make install` and the image install) pins each requirement of setup.cfg and of its
    extras to a version setup.cfg allows, and leaves torch to the machine: a requirement added or raised without
    running .ci/lock fails here rather than on a user's machine."""
    import configparser

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    sections = [cfg["options"]["install_requires"], *cfg["options.extras_require"].values()]
    required = [Requirement(line) for text in sections for line in text.splitlines() if line.strip()]
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if line and line[0] != "#"
    )
    pins = {canonicalize_name(name): version for name, version in pins.items()}
    assert "torch" not in pins and len(required) > 30
    for requirement in required:
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"{requirement} is not in constraints.txt: run .ci/lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {requirement}"
