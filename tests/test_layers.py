"""The floors, read from the code itself: data_contracts -> gram_core -> tasks -> flows -> bench | scripts, each
importing only downward (bench and scripts share the top floor and import neither each other nor anything above);
Ray only in the Ray modules, MLflow only in the tracking/registry modules, Prefect never in gram_core or
data_contracts; and importing gram_core loads none of the three.

Every import counts: ``import``/``from ... import`` anywhere in a file (inside functions too), relative ones
(resolved against the file's package), and dynamic ones (``importlib.import_module``, ``__import__``): a constant
name is resolved and checked like any import; a name computed at run time cannot be checked, so it is refused
outside ``DYNAMIC_IMPORTS``. No file edits ``sys.path`` (scripts and benchmarks run as ``python -m scripts.x``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS: tuple[tuple[str, ...], ...] = (("data_contracts",), ("gram_core",), ("tasks",), ("flows",), ("bench", "scripts"))
FLOOR_OF = {package: level for level, packages in enumerate(FLOORS) for package in packages}

# The modules allowed to import each engine, with the reason each one is needed. One module per engine is not
# possible for these two; the reasons say why, so a new entry has to bring one.
RAY_MODULES = {
    "tasks/on_ray/runtime.py": "the runtime every Ray user shares: start or join a cluster, object-store URIs, the "
                            "progress queue",
    "tasks/on_ray/train.py": "the Ray Train driver (TorchTrainer, checkpoints, the run's result)",
    "tasks/on_ray/worker.py": "the loop each Ray Train worker runs (ray.train.report, its rank); apart from the driver "
                           "so that a worker unpickles none of the driver's code",
    "tasks/on_ray/judge.py": "Ray Data: actors that judge the eval set (eval.actors), another Ray library than Train",
    "tasks/serving/server.py": "Ray Serve: the reward server's deployment, a third Ray library",
}
MLFLOW_MODULES = {
    "tasks/on_mlflow/tracking.py": "tracking: runs, params, metrics and artifacts of a pipeline run",
    "tasks/on_mlflow/model_registry.py": "the registry: logs the judge as a pyfunc model, versions, aliases, the model cache",
    "tasks/on_mlflow/promotion_gate.py": "the champion gate: moves the alias under the promotion lock (MlflowClient)",
    "tasks/on_mlflow/judge_pyfunc.py": "the pyfunc's code, which MLflow stores inside the model (models-from-code) and runs "
                             "alone in a scoring server: it subclasses mlflow.pyfunc.PythonModel and can lean on no "
                             "other tasks module",
}
# Files allowed a dynamic import whose module name is computed at run time, with the reason.
DYNAMIC_IMPORTS = {
    "tasks/store/caching.py": "code_version hashes the sources of CODE_PACKAGES (gram_core, data_contracts, tasks: its "
                        "own floor and below), imported by name to find their folders",
}
DYNAMIC = "<a module name computed at run time>"
SYS_PATH = "<sys.path edited>"
BEYOND_TOP = "<a relative import beyond the top level>"


def _package(path: str) -> list[str]:
    """The package a file's relative imports resolve against: 'gram_core/x.py' -> ['gram_core']."""
    return path.split("/")[:-1]


def _resolve(name: str, level: int, package: list[str]) -> str:
    """An import's absolute module name (``level`` dots before ``name``), or BEYOND_TOP."""
    if level == 0:
        return name
    if level - 1 > len(package):
        return BEYOND_TOP
    return ".".join([*package[:len(package) - (level - 1)], *([name] if name else [])])


def _dynamic_name(call: ast.Call, package: list[str]) -> str | None:
    """The module a call imports (importlib.import_module, import_module, __import__); None: not an import."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    first = call.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return DYNAMIC
    level = len(first.value) - len(first.value.lstrip("."))
    return _resolve(first.value[level:], level, package) if name == "import_module" else first.value


def _edits_sys_path(node: ast.AST) -> bool:
    """``sys.path.insert(...)``/``append``/``extend``, or ``sys.path = ...`` / ``sys.path[...] = ...``."""
    def is_sys_path(value: ast.AST) -> bool:
        return isinstance(value, ast.Attribute) and value.attr == "path" and isinstance(value.value, ast.Name) \
            and value.value.id == "sys"

    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return is_sys_path(node.func.value) and node.func.attr in ("insert", "append", "extend")
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(is_sys_path(t.value if isinstance(t, ast.Subscript) else t) for t in targets)
    return False


def imported_modules(source: str, path: str = "x.py") -> set[str]:
    """Every module the file at ``path`` imports: static, relative (resolved) and dynamic imports, anywhere in the
    file; plus DYNAMIC, SYS_PATH and BEYOND_TOP markers for what cannot be checked."""
    package = _package(path)
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node.module or "", node.level, package)
            if module == BEYOND_TOP:
                found.add(module)
            elif module:
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
            else:  # `from .. import tasks` at the top level: each name is a package
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Call) and (name := _dynamic_name(node, package)):
            found.add(name)
        if _edits_sys_path(node):
            found.add(SYS_PATH)
    return found


def top_names(source: str, path: str) -> set[str]:
    return {name if name.startswith("<") else name.split(".")[0] for name in imported_modules(source, path)}


def package_files() -> dict[str, set[str]]:
    """'floor/file.py' -> the top-level names it imports, for every module of every floor."""
    return {path.relative_to(ROOT).as_posix(): top_names(path.read_text(), path.relative_to(ROOT).as_posix())
            for floor in FLOORS for package in floor for path in sorted((ROOT / package).rglob("*.py"))}


def violations(files: dict[str, set[str]]) -> list[str]:
    """What breaks the floors: an import of a floor above (or of the top floor's sibling), Ray, MLflow or
    Prefect outside their rooms, a dynamic import that cannot be checked, a sys.path edit."""
    out = []
    for path, tops in files.items():
        package = path.split("/")[0]
        floor = FLOOR_OF[package]
        for top in sorted(tops):
            if top in FLOOR_OF and top != package and FLOOR_OF[top] >= floor:
                where = "a floor above" if FLOOR_OF[top] > floor else "its sibling on the top floor"
                out.append(f"{path} imports {top} ({where})")
        if "ray" in tops and path not in RAY_MODULES:
            out.append(f"{path} imports ray (only {sorted(RAY_MODULES)} may)")
        if "mlflow" in tops and path not in MLFLOW_MODULES:
            out.append(f"{path} imports mlflow (only {sorted(MLFLOW_MODULES)} may)")
        if "prefect" in tops and floor <= FLOOR_OF["gram_core"]:
            out.append(f"{path} imports prefect (gram_core and data_contracts never do)")
        if DYNAMIC in tops and path not in DYNAMIC_IMPORTS:
            out.append(f"{path} makes a dynamic import of {DYNAMIC} (no check can read it; import it by name)")
        if BEYOND_TOP in tops:
            out.append(f"{path} makes {BEYOND_TOP}")
        if SYS_PATH in tops:
            out.append(f"{path} edits sys.path (run it as a module: python -m {path[:-3].replace('/', '.')})")
    return out


def test_every_floor_imports_only_downward_and_frameworks_stay_in_their_rooms():
    files = package_files()
    assert {p.split("/")[0] for p in files} == set(FLOOR_OF)
    assert violations(files) == []
    # The floors are really stacked: each imports the one below it (bench and scripts: gram_core at least).
    for upper, lower in (("gram_core", "data_contracts"), ("tasks", "gram_core"), ("flows", "tasks"),
                         ("bench", "gram_core"), ("scripts", "gram_core")):
        assert any(lower in tops for path, tops in files.items() if path.startswith(f"{upper}/")), (upper, lower)


def test_the_engine_allowlists_hold_no_stale_entry():
    """Each allowed module still imports its engine (an entry that does not is a door left open)."""
    files = package_files()
    for engine, allowed in (("ray", RAY_MODULES), ("mlflow", MLFLOW_MODULES)):
        assert [path for path in allowed if engine not in files[path]] == [], engine
    assert [path for path in DYNAMIC_IMPORTS if DYNAMIC not in files[path]] == []
    # tasks/__init__.py points here instead of keeping a second list that goes stale.
    package_doc = (ROOT / "tasks" / "__init__.py").read_text()
    assert "tests/test_layers.py" in package_doc and not any(p in package_doc for p in [*RAY_MODULES, *MLFLOW_MODULES])


def test_each_engine_stays_in_its_room():
    """tasks/ has rooms (issue 23): Ray lives in tasks/on_ray/ (plus the server, on Ray Serve), MLflow in
    tasks/on_mlflow/, and the store imports neither."""
    assert all(p.startswith("tasks/on_ray/") or p == "tasks/serving/server.py" for p in RAY_MODULES)
    assert all(p.startswith("tasks/on_mlflow/") for p in MLFLOW_MODULES)
    store = {p: tops for p, tops in package_files().items() if p.startswith("tasks/store/")}
    assert store and not any({"ray", "mlflow"} & tops for tops in store.values())


@pytest.mark.parametrize("path, source, expected", [
    ("gram_core/x.py", "def f():\n    from tasks.settings import RayConfig\n", "imports tasks (a floor above)"),
    ("data_contracts/x.py", "import gram_core.config\n", "imports gram_core (a floor above)"),
    ("tasks/x.py", "from flows import cli\n", "imports flows (a floor above)"),
    ("flows/x.py", "import scripts.build_starter\n", "imports scripts (a floor above)"),
    ("bench/x.py", "from scripts.starter_categories import make_items\n", "imports scripts (its sibling"),
    ("tasks/evaluate.py", "import ray.data\n", "imports ray"),
    ("flows/x.py", "from mlflow import MlflowClient\n", "imports mlflow"),
    ("gram_core/x.py", "from prefect import task\n", "imports prefect"),
    # relative imports, resolved against the file's package
    ("gram_core/x.py", "from ..tasks import settings\n", "imports tasks (a floor above)"),
    ("data_contracts/x.py", "from . import schemas\nfrom .. import gram_core\n", "imports gram_core (a floor above)"),
    ("gram_core/x.py", "from ... import tasks\n", "a relative import beyond the top level"),
    # dynamic imports
    ("gram_core/x.py", "import importlib\nimportlib.import_module('tasks.settings')\n", "imports tasks (a floor above)"),
    ("gram_core/x.py", "from importlib import import_module\nimport_module('.sub', 'x')\nimport_module('ray')\n",
     "imports ray"),
    ("tasks/x.py", "def f():\n    return __import__('flows.cli')\n", "imports flows (a floor above)"),
    ("tasks/x.py", "import importlib\nimportlib.import_module(NAME)\n", "dynamic import"),
    ("scripts/x.py", "import sys\nsys.path.insert(0, '..')\n", "edits sys.path"),
    ("bench/x.py", "import sys\nsys.path[:0] = ['..']\n", "edits sys.path"),
])
def test_the_check_finds_each_kind_of_violation(path, source, expected):
    files = {**package_files(), path: top_names(source, path)}
    found = violations(files)
    assert len(found) == 1 and expected in found[0] and found[0].startswith(path), found


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
