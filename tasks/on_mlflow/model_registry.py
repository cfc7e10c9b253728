"""The model registry: log a trained judge as an MLflow pyfunc, register it, and gate promotion by alias.

Every registration becomes version N of ``MlflowConfig.model_name`` with alias ``candidate``; the alias
``champion`` moves only through ``promote_if_better`` (no champion yet, or same eval set and a score above
the champion's by more than the margin). Decisions are recorded as version tags (``promotion/*``).

Serving the champion (the gram-pipeline package must be importable, hence ``--env-manager local``)::

    export MLFLOW_TRACKING_URI=sqlite:///$PWD/.gram/mlflow.db
    mlflow models serve -m models:/gram-reward-model@champion --env-manager local -h 127.0.0.1 -p 5001

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{
      "dataframe_split": {"columns": ["prompt", "response_a", "response_b"],
                          "data": [["What is 2+2?", "4", "5"]]}}'
    # -> {"predictions": [{"p_a_better": 0.83, "p_order1": 0.86, "p_order2": 0.80, "consistent": true}]}

The server is up in ~20 s on 2 CPUs (poll ``/ping``). ``--env-manager virtualenv/conda`` would fail: the
pinned requirements do not include gram-pipeline, which is not on PyPI. In Python:
``load_registered_judge("models:/gram-reward-model@champion").predict(df)`` with the same columns;
``model_config={"device": "cpu"}`` (or ``"dtype": "bfloat16"`` on a GPU) overrides the logged options.

Concurrency: registration and the gate run under one file lock per (tracking URI, model name)
(``promotion_lock``): read the champion, compare, move the alias is atomic for every process that shares the
lock folder (beside the sqlite file; ``$GRAM_LOCK_DIR`` or ``~/.cache/gram/locks`` for a server). A version
is identified by its model content (tag ``model_sha256``): registering the same content again reuses it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from gram_core.config import JudgeConfig, to_dict
from gram_core.folders import write_json
from tasks.on_mlflow import judge_pyfunc
from tasks.on_mlflow.judge_pyfunc import INPUT_COLUMNS
from tasks.on_mlflow.promotion_gate import (  # noqa: F401  (the gate's names, also read from here)
    CANDIDATE,
    CHAMPION,
    PromotionConflict,
    PromotionDecision,
    promote_if_better,
    promotion_lock,
    promotion_lock_path,
    registry_key,
)
from tasks.on_mlflow.tracking import model_version_url, use_tracking_uri
from tasks.redaction import redact
from tasks.settings import MlflowConfig
from tasks.store.artifacts import HASH_CHARS, folder_sha256
from tasks.store.locks import file_lock

ARTIFACT_NAME = "judge"  # LoggedModel name inside the run
CONTENT_TAG = "model_sha256"  # a version's identity: the SHA-256 of its model folder
# What the pyfunc imports at load time; pinned to the versions it was logged with.
RUNTIME_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas",
                    "pyarrow", "pyyaml")

# Versions logged before models-from-code hold a cloudpickled reference to this name: keep it importable.
GramJudgeModel = judge_pyfunc.GramJudgeModel
INPUT_EXAMPLE = pd.DataFrame({"prompt": ["What is 2+2?"], "response_a": ["4"], "response_b": ["5"]})
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", c) for c in INPUT_COLUMNS]),
    outputs=Schema([ColSpec("double", "p_a_better"), ColSpec("double", "p_order1"),
                    ColSpec("double", "p_order2"), ColSpec("boolean", "consistent")]),
)


def pip_requirements() -> list[str]:
    """Exact pins of the runtime packages installed now (the local build tag of torch dropped)."""
    pins = []
    for name in RUNTIME_PACKAGES:
        version = importlib.metadata.version(name).split("+")[0]
        pins.append(f"{name}=={version}")
    return pins




@dataclasses.dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_uri: str          # models:/NAME/VERSION
    logged_model_uri: str   # models:/m-<id> (the LoggedModel in the run)
    run_id: str
    url: str | None         # UI page of the version when the tracking URI is http(s)
    promotion: PromotionDecision
    reused: bool = False    # an existing version with the same model content (nothing new registered)


def version_by_content(client: MlflowClient, name: str, model_sha256: str):
    """The (oldest) version of ``name`` whose tag ``model_sha256`` equals the given hash, or None."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.{CONTENT_TAG} = '{model_sha256}'")
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


def log_and_register(model_dir: str | Path, cfg: MlflowConfig, eval_metrics: Mapping[str, float],
                     tags: Mapping[str, Any] | None, eval_set_id: str, *,
                     judge_config: JudgeConfig | None = None, model_sha256: str | None = None) -> RegisteredVersion:
    """Register ``model_dir`` (a saved HF folder) as a version of ``cfg.model_name``, tag it (``tags`` e.g.
    config_hash / data hashes, every eval metric, ``eval_set_id``), set alias ``candidate``, run the gate.

    Idempotent by content: when a version tagged with this folder's ``model_sha256`` exists, it is reused
    (its eval tags updated to this evaluation) instead of logging a duplicate; otherwise the folder is
    logged as the judge pyfunc (tasks/on_mlflow/judge_pyfunc.py, models-from-code) in the active run and registered as the next version.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"log_and_register: {model_dir} is not a saved HF model folder (no config.json)")
    if not eval_set_id:
        raise ValueError("log_and_register: eval_set_id must be a non-empty id of the evaluation set")
    metrics = {k: float(v) for k, v in eval_metrics.items()}
    if cfg.promotion_metric not in metrics:
        raise ValueError(f"log_and_register: promotion metric {cfg.promotion_metric!r} (mlflow.promotion_metric) "
                         f"is not among the eval metrics {sorted(metrics)}")
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_and_register: no active MLflow run in this thread; call it inside "
                           "tasks.on_mlflow.tracking.stage_run(...) or start_pipeline_run(...)")
    sha = model_sha256 or folder_sha256(model_dir)
    client = MlflowClient()
    existing = version_by_content(client, cfg.model_name, sha)
    logged_uri = existing.source if existing else None
    if existing is None:  # log outside the lock (slow); register under it, re-checking for a twin
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT_NAME, python_model=judge_pyfunc.__file__, artifacts={"model": str(model_dir)},
            signature=SIGNATURE, input_example=INPUT_EXAMPLE, pip_requirements=pip_requirements(),
            model_config={"judge": to_dict(judge_config or JudgeConfig()), "dtype": "float32", "device": "auto"})
        logged_uri = info.model_uri
    with promotion_lock(client.tracking_uri, cfg.model_name):
        existing = existing or version_by_content(client, cfg.model_name, sha)
        if existing is None:
            registered = mlflow.register_model(logged_uri, cfg.model_name, tags={CONTENT_TAG: sha})
            version = str(registered.version)
        else:
            version, logged_uri = str(existing.version), existing.source
        version_tags = {**{k: redact(str(v)) for k, v in (tags or {}).items()}, CONTENT_TAG: sha,
                        "eval_set_id": eval_set_id, **{k: repr(v) for k, v in metrics.items()}}
        for key, value in version_tags.items():
            client.set_model_version_tag(cfg.model_name, version, key, value)
        client.set_registered_model_alias(cfg.model_name, CANDIDATE, version)
        decision = promote_if_better(client, cfg.model_name, version, cfg.promotion_metric, cfg.promotion_margin,
                                     eval_set_id)
    url = model_version_url(mlflow.get_tracking_uri(), cfg.model_name, version)
    run_id = existing.run_id if existing is not None else run.info.run_id
    return RegisteredVersion(cfg.model_name, version, f"models:/{cfg.model_name}/{version}", logged_uri,
                             run_id, url, decision, reused=existing is not None)


def current_aliases(name: str, version: str, tracking_uri: str) -> list[str]:
    """Aliases pointing at a version now (looked up by alias: the reliable MLflow call)."""
    client, out = MlflowClient(tracking_uri), []
    for alias in (CHAMPION, CANDIDATE):
        try:
            if str(client.get_model_version_by_alias(name, alias).version) == str(version):
                out.append(alias)
        except MlflowException:
            continue
    return out


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """'models:/NAME@ALIAS' -> (NAME, ALIAS, None); 'models:/NAME/VERSION' -> (NAME, None, VERSION)."""
    if not model_uri.startswith("models:/"):
        raise ValueError(f"expected a registry URI models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}")
    rest = model_uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.partition("/")
    if not version:
        raise ValueError(f"{model_uri!r}: name a version (models:/{name}/3) or an alias (models:/{name}@champion)")
    return name, None, version


class ModelNotFoundError(LookupError):
    """A registry URI names a model, alias or version that is not there; the message lists what is."""


def resolve_version(client: MlflowClient, model_uri: str, tracking_uri: str):
    """The ModelVersion a registry URI points at, or ModelNotFoundError naming what exists instead."""
    name, alias, version = parse_model_uri(model_uri)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    where = f"in the registry at {tracking_uri}"
    names = sorted(m.name for m in client.search_registered_models(max_results=100))
    if name not in names:
        raise ModelNotFoundError(f"{model_uri}: no registered model {name!r} {where}; registered models there: "
                                 f"{', '.join(names) or '(none)'}")
    model = client.get_registered_model(name)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    raise ModelNotFoundError(f"{model_uri}: model {name!r} has no {'alias ' + repr(alias) if alias else 'version ' + version}"
                             f" {where}; its aliases: {', '.join(sorted(model.aliases)) or '(none)'}, versions: "
                             f"{', '.join(map(str, versions)) or '(none)'}")


def find_version(model_uri: str, tracking_uri: str):
    """``resolve_version`` against ``tracking_uri``; a SQLite registry that does not exist yet is not created."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise ModelNotFoundError(f"{model_uri}: there is no MLflow registry at {tracking_uri} yet (a pipeline run "
                                 "creates it; or set MLFLOW_TRACKING_URI / --set mlflow.tracking_uri=...)")
    use_tracking_uri(tracking_uri)
    return resolve_version(MlflowClient(tracking_uri), model_uri, tracking_uri)


CACHE_INDEX = "by-version"  # <cache>/by-version/<name>/<version>.json -> the content folder of that version


def registered_model_dir(model_uri: str, tracking_uri: str, cache: Path) -> tuple[Path, str]:
    """The HF folder of a registered judge, downloaded once per version into ``cache/<sha256[:16]>/``.

    Returns (folder, 'models:/NAME/VERSION'). An alias is resolved on every call (it moves); a version's
    files never change, so they are fetched once, hashed, checked against the version's ``model_sha256`` tag
    (set at registration), and moved into place under their hash. Later calls check the index entry (same
    name, version and registry source) and the files' sizes, then reuse the folder.
    """
    found = find_version(model_uri, tracking_uri)
    resolved = f"models:/{found.name}/{found.version}"
    index = cache / CACHE_INDEX / found.name / f"{found.version}.json"
    cached = _cached_folder(cache, index, found.source)
    if cached is not None:
        return cached, resolved
    cache.mkdir(parents=True, exist_ok=True)
    # One writer at a time (threads and processes; `gram gc` takes it too): two cold `gram judge` calls
    # download once, and gc never removes a download in progress.
    with file_lock(registered_cache_lock(cache), "registered-model cache", owner_thread=True):
        cached = _cached_folder(cache, index, found.source)  # the other caller may have fetched it meanwhile
        if cached is not None:
            return cached, resolved
        return _download_into_cache(found, resolved, tracking_uri, cache, index), resolved


def registered_cache_lock(cache: Path) -> Path:
    return Path(cache) / ".cache.lock"


def _cached_folder(cache: Path, index: Path, source: str) -> Path | None:
    if not index.is_file():
        return None
    try:
        entry = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    folder = cache / entry["folder"]
    return folder if entry.get("source") == source and _sizes_match(folder, entry["sizes"]) else None


def _download_into_cache(found: Any, resolved: str, tracking_uri: str, cache: Path, index: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        source, _ = download_registered_model(resolved, tracking_uri, Path(tmp))
        sha = folder_sha256(source)
        expected = found.tags.get(CONTENT_TAG)
        if expected and expected != sha:
            raise RuntimeError(f"{resolved}: downloaded files hash to {sha[:16]}, but the version's model_sha256 "
                               f"tag says {expected[:16]}; the registry's artifacts were changed after registration")
        sizes = {p.relative_to(source).as_posix(): p.stat().st_size for p in sorted(source.rglob("*")) if p.is_file()}
        folder = cache / sha[:HASH_CHARS]
        if folder.is_dir() and not _sizes_match(folder, sizes):
            os.rename(folder, Path(tmp) / "damaged")  # removed with the temporary folder
        if not folder.is_dir():
            os.rename(source, folder)  # same filesystem: atomic; a concurrent call may have won (then reuse it)
    index.parent.mkdir(parents=True, exist_ok=True)
    write_json(index, {"folder": folder.name, "sha256": sha, "source": found.source, "sizes": sizes})
    return folder


def _sizes_match(folder: Path, sizes: Mapping[str, int]) -> bool:
    try:
        return all((folder / rel).stat().st_size == size for rel, size in sizes.items())
    except OSError:
        return False


def download_registered_model(model_uri: str, tracking_uri: str, dst: Path) -> tuple[Path, str]:
    """Download a registered judge's HF folder; returns (folder, 'models:/NAME/VERSION' it resolved to)."""
    use_tracking_uri(tracking_uri)
    found = resolve_version(MlflowClient(tracking_uri), model_uri, tracking_uri)
    resolved = f"models:/{found.name}/{found.version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=resolved, dst_path=str(dst)))
    folders = sorted(p.parent for p in local.rglob("config.json") if any(p.parent.glob("*.safetensors")))
    if not folders:
        raise FileNotFoundError(f"{model_uri} ({resolved}) holds no Hugging Face model folder (config.json + "
                                f"*.safetensors) under {local}")
    return folders[0], resolved


def load_registered_judge(model_uri: str = "models:/gram-reward-model@champion", *, tracking_uri: str | None = None,
               model_config: Mapping[str, Any] | None = None) -> mlflow.pyfunc.PyFuncModel:
    """Load a registered judge (by alias or version) as a pyfunc; ``.predict(df)`` as in the module docs."""
    if tracking_uri:
        use_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri, model_config=dict(model_config) if model_config else None)
