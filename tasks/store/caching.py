"""Cache keys for the pipeline's Prefect tasks.

A stage's cache key covers its inputs (upstream ``ArtifactRef`` values, whose content hashes change when
the data does, and its resolved config), the task's own source (``TASK_SOURCE``) and the version of the
library code it runs. ``TASK_SOURCE`` alone misses changes in the functions a task calls, so
``CODE_VERSION`` hashes every source file of gram_core, data_contracts and tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy

# The packages whose code decides what a stage produces (flows/ only composes, so it is left out).
CODE_PACKAGES = ("gram_core", "data_contracts", "tasks")
_SKIP_SUFFIXES = (".pyc", ".pyo")


def _package_dir(name: str) -> Path:
    module = __import__(name)
    return Path(next(iter(module.__path__)))


@functools.lru_cache(maxsize=1)
def code_version(length: int = 16) -> str:
    """Hash of every source/data file in ``CODE_PACKAGES`` (relative path + bytes, sorted)."""
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        root = _package_dir(package)
        files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       and not p.name.endswith(_SKIP_SUFFIXES))
        for path in files:
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:length]


@dataclasses.dataclass
class CodeVersion(CachePolicy):
    """Cache-key component: the library code version (see ``code_version``)."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        return code_version()


CODE_VERSION = CodeVersion()
# Every cached stage uses this; DEFAULT would add the run id and never hit across flow runs.
STAGE_CACHE_POLICY = INPUTS + TASK_SOURCE + CODE_VERSION


def stage_options(result_dir: str | Path, refresh: bool = False,
                  policy: CachePolicy = STAGE_CACHE_POLICY) -> dict[str, Any]:
    """Task options binding cached results to one state folder; ``refresh`` recomputes and overwrites.
    A task that is never cached (``NO_CACHE``: registration) keeps no result file."""
    if policy is NO_CACHE:
        return {"cache_policy": NO_CACHE, "persist_result": False}
    from tasks.store.ref_records import record_hook  # gc reads these JSON records, never the result pickles

    return {"result_storage": Path(result_dir), "persist_result": True, "refresh_cache": refresh,
            "cache_policy": policy, "on_completion": [record_hook(result_dir)]}


def stage_logger(name: str = "gram"):
    """Prefect's run logger inside a task or flow (shown in the UI), a plain logger elsewhere (tests, CLI)."""
    import logging

    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(name)


# Inputs that identify where a run is logged, not what it computes: left out of cache keys.
NOT_IN_KEY = ("tracking",)


def bind(task: Any, result_dir: str | Path, refresh: bool = False) -> Any:
    """``task`` with its cached results kept in ``result_dir``; ``refresh`` recomputes and overwrites."""
    policy = task.cache_policy
    for name in NOT_IN_KEY:
        policy = policy - name
    return task.with_options(**stage_options(result_dir, refresh, policy))
