"""The four floors, read from the code itself: flows -> tasks -> gram_core -> data_contracts, each importing
only downward; Ray only in the Ray modules, MLflow only in the tracking/registry modules, Prefect never in
gram_core or data_contracts; and importing gram_core loads none of the three.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("data_contracts", "gram_core", "tasks", "flows")  # ground floor first
RAY_MODULES = {"tasks/ray_train.py", "tasks/ray_worker.py", "tasks/ray_runtime.py", "tasks/ray_judge.py",
               "tasks/serve.py"}
MLFLOW_MODULES = {"tasks/tracking.py", "tasks/model_registry.py", "tasks/promotion_gate.py", "tasks/judge_pyfunc.py"}


def imported_modules(source: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names, anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def package_files() -> dict[str, set[str]]:
    """'floor/file.py' -> the top-level names it imports, for every module of the four floors."""
    return {path.relative_to(ROOT).as_posix(): {name.split(".")[0] for name in imported_modules(path.read_text())}
            for floor in FLOORS for path in sorted((ROOT / floor).rglob("*.py"))}


def violations(files: dict[str, set[str]]) -> list[str]:
    """What breaks the floors: an upward import, and Ray, MLflow or Prefect outside their rooms."""
    out = []
    for path, tops in files.items():
        floor = FLOORS.index(path.split("/")[0])
        out += [f"{path} imports {top} (a floor above)" for top in tops if top in FLOORS[floor + 1:]]
        if "ray" in tops and path not in RAY_MODULES:
            out.append(f"{path} imports ray (only {sorted(RAY_MODULES)} may)")
        if "mlflow" in tops and path not in MLFLOW_MODULES:
            out.append(f"{path} imports mlflow (only {sorted(MLFLOW_MODULES)} may)")
        if "prefect" in tops and floor <= FLOORS.index("gram_core"):
            out.append(f"{path} imports prefect (gram_core and data_contracts never do)")
    return out


def test_every_floor_imports_only_downward_and_frameworks_stay_in_their_rooms():
    files = package_files()
    assert {p.split("/")[0] for p in files} == set(FLOORS)
    assert violations(files) == []
    # The ground floor is really below gram_core: gram_core imports the contracts it writes.
    assert any("data_contracts" in tops for path, tops in files.items() if path.startswith("gram_core/"))


@pytest.mark.parametrize("path, source, expected", [
    ("gram_core/x.py", "def f():\n    from tasks.settings import RayConfig\n", "imports tasks (a floor above)"),
    ("data_contracts/x.py", "import gram_core.config\n", "imports gram_core (a floor above)"),
    ("tasks/x.py", "from flows import cli\n", "imports flows (a floor above)"),
    ("tasks/evaluate.py", "import ray.data\n", "imports ray"),
    ("flows/x.py", "from mlflow import MlflowClient\n", "imports mlflow"),
    ("gram_core/x.py", "from prefect import task\n", "imports prefect"),
])
def test_the_check_finds_each_kind_of_violation(path, source, expected):
    files = {**package_files(), path: {name.split(".")[0] for name in imported_modules(source)}}
    found = violations(files)
    assert len(found) == 1 and expected in found[0] and found[0].startswith(path)


def test_importing_gram_core_loads_no_orchestration_framework():
    modules = sorted(f"gram_core.{p.stem}" for p in (ROOT / "gram_core").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for name in {modules!r} + ['data_contracts']:\n"
            "    importlib.import_module(name)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'ray', 'mlflow', 'tasks', 'flows'}))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
    assert len(modules) > 20  # every module of gram_core was imported, not just its package face
