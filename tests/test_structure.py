"""Project structure rules: imports point one way, configs never rot, the CLI starts light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = {"pipeline.execution", "pipeline.segment", "pipeline.cluster", "pipeline.cli"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "workers").glob("*.py")), ids=lambda p: p.name)
def test_workers_never_import_orchestration(path: Path) -> None:
    bad = {m for m in imported_modules(path) if any(m == o or m.startswith(o + ".") for o in ORCHESTRATION)}
    assert not bad, f"{path.name} imports orchestration modules {bad}; workers may use config, geometry, I/O only"


@pytest.mark.parametrize("path", sorted((ROOT / "pipeline").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_pipeline_never_imports_workers_at_module_level(path: Path) -> None:
    tree = ast.parse(path.read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {getattr(n, "module", None) or n.names[0].name for n in top}
    assert not {n for n in names if n and n.startswith("workers")}, f"{path} imports workers at module level"


def config_models() -> dict[str, type]:
    from pipeline.config.segment import SegmentConfig
    from pipeline.config.train import TrainConfig

    models: dict[str, type] = {
        "demo.yaml": SegmentConfig,
        "demo_sharded.yaml": SegmentConfig,
        "lucchi_fast.yaml": SegmentConfig,
        "score_lucchi_test.yaml": SegmentConfig,
        "demo_train.yaml": TrainConfig,
        "finetune_example.yaml": TrainConfig,
        "lucchi.yaml": TrainConfig,
        "lucchi_gpu.yaml": TrainConfig,
    }
    try:
        from pipeline.config.instances import InstancesConfig

        models["instances.yaml"] = InstancesConfig
    except ImportError:
        pass
    return models


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_validates(path: Path) -> None:
    from pipeline.config import load_config

    models = config_models()
    assert path.name in models, f"{path.name} has no model in this test: add it so the file cannot rot"
    load_config(models[path.name], path)


def test_help_does_not_import_torch() -> None:
    code = "import sys; from pipeline.cli import app; print('torch' in sys.modules, 'cloudvolume' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]
