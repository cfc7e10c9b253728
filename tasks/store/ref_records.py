"""JSON records of the artifacts each cached stage result refers to: what ``gram gc`` reads to decide what is
live, so that it never unpickles anything (a Prefect result is a pickle; another user's ``.home`` in a shared
store could point at a crafted one).

Every cached task result ``<results>/<key>`` gets a twin ``<results>/.refs/<key>.json`` (written atomically by
a completion hook that ``tasks.store.caching.bind`` adds, for a computed result and a cache hit alike) holding the
URIs and hashes of the ``ArtifactRef`` values in the result. gc reads only these records; a result file without
one (written before records existed, or a hook that failed) counts as unreadable, so no artifact is pruned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gram_core.folders import write_json
from tasks.store.artifacts import ArtifactRef

RECORDS = ".refs"  # inside a results folder
HOOK_NAME = "record_artifact_refs"


class _QuietHook(logging.Filter):
    """Prefect logs "Running hook ..." for every hook of every task run: bookkeeping, not news, on the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return HOOK_NAME not in str(record.msg)


logging.getLogger("prefect.task_runs").addFilter(_QuietHook())


def artifact_refs(value: Any) -> Iterator[ArtifactRef]:
    """Every ``ArtifactRef`` inside ``value`` (dicts, lists, tuples, sets, dataclasses)."""
    if isinstance(value, ArtifactRef):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from artifact_refs(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from artifact_refs(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from artifact_refs(getattr(value, f.name))


def record_path(results_dir: str | Path, key: str) -> Path:
    return Path(results_dir) / RECORDS / f"{Path(key).name}.json"


def write_record(results_dir: str | Path, key: str, value: Any, task: str = "") -> Path:
    """The record of the result stored under ``key`` in ``results_dir`` (atomic: fsynced file, then rename)."""
    target = record_path(results_dir, key)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    refs = [{"uri": r.uri, "sha256": r.sha256, "kind": r.kind} for r in artifact_refs(value)]
    write_json(target, {"key": Path(key).name, "task": task, "refs": refs,
                        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return target


def record_hook(results_dir: str | Path):
    """A Prefect ``on_completion`` hook writing the record of the task's stored result (computed or cached)."""

    def hook(task: Any, task_run: Any, state: Any) -> None:
        metadata = getattr(getattr(state, "data", None), "metadata", None)
        key = getattr(metadata, "storage_key", None)
        if not key:
            return  # no persisted result: nothing gc could keep alive through it
        write_record(results_dir, key, state.result(), getattr(task, "name", ""))

    hook.__name__ = HOOK_NAME
    return hook


def read_records(results_dir: str | Path) -> tuple[list[tuple[str, str]], list[Path]]:
    """(uri, sha256) of every artifact the results in ``results_dir`` refer to, read from their JSON records
    only, and the result files without a readable record. Nothing is unpickled or imported."""
    results_dir = Path(results_dir)
    refs: list[tuple[str, str]] = []
    unreadable: list[Path] = []
    if not results_dir.is_dir():
        return refs, unreadable
    for path in sorted(results_dir.iterdir()):
        if not path.is_file() or path.suffix == ".lock" or path.name.startswith("."):
            continue
        try:
            record = json.loads(record_path(results_dir, path.name).read_text())
            found = [(str(r["uri"]), str(r["sha256"])) for r in record["refs"]]
            if record.get("key") != path.name or not all(isinstance(r, dict) for r in record["refs"]):
                raise ValueError("record of another result")
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            unreadable.append(path)
            continue
        refs += found
    return refs, unreadable
