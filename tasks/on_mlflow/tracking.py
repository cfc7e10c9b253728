"""MLflow tracking for the pipeline: one parent run per pipeline run, one nested child run per stage.

With tasks/on_mlflow/model_registry.py (and the stored pyfunc code) the only module that imports MLflow. Runs are
passed around as small, picklable ``RunHandle`` values, because MLflow's "active run" is thread-local: a Prefect task running in a worker
thread (or a Ray worker) does not see the parent run of the flow, so ``stage_run(..., parent=handle)``
nests explicitly. Every logging function takes ``run_id=None`` meaning "this thread's active run".

Nothing here writes to ``./mlruns``: the default backend is ``sqlite:///<home>/mlflow.db`` (the state folder,
passed in) and the experiment gets an explicit artifact location ``<home>/mlartifacts``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import numbers
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from tasks.redaction import install_log_redaction, redact
from tasks.settings import MlflowConfig

install_log_redaction()  # what MLflow, Prefect and our own loggers write passes through redact()

# Quiet by default: no "Downloading artifacts" bars when registering or fetching a model (set it to true to see them).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_log = logging.getLogger(__name__)
TRUNCATION_MARK = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")  # MLflow allows only these in param/metric names


@dataclasses.dataclass(frozen=True)
class RunHandle:
    """Where a run lives; small and picklable so tasks in other threads/processes can nest under it."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    url: str | None  # UI link when the tracking URI is an http(s) server, else None


# mlflow.set_tracking_uri also writes $MLFLOW_TRACKING_URI; remember what we wrote so that a value we set
# for one GRAM_HOME is not mistaken for the user's choice on the next call.
_ENV_STATE: dict[str, str | None] = {"written": None, "user": None}


def _user_env_uri() -> str | None:
    value = os.environ.get("MLFLOW_TRACKING_URI") or None
    if value is not None and value == _ENV_STATE["written"]:
        return _ENV_STATE["user"]
    return value


def use_tracking_uri(uri: str) -> None:
    """mlflow.set_tracking_uri, keeping track of whether $MLFLOW_TRACKING_URI was the user's or ours.

    MLflow exports the URI to ``$MLFLOW_TRACKING_URI`` for child processes (Ray workers, subprocesses), whose
    output we do not redact: a password in it moves to ``$MLFLOW_TRACKING_USERNAME/PASSWORD`` (MLflow's own
    basic-auth variables), and the exported URI carries none."""
    _ENV_STATE["user"] = _user_env_uri()
    mlflow.set_tracking_uri(uri)
    exported = _export_without_credentials(uri)
    _ENV_STATE["written"] = exported


def _export_without_credentials(uri: str) -> str:
    """Put ``uri`` into the environment with its user:password moved to MLflow's basic-auth variables."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not is_http(uri) or parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    bare = urlunsplit(parts._replace(netloc=host))
    os.environ["MLFLOW_TRACKING_URI"] = bare
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return bare


def resolve_tracking_uri(cfg: MlflowConfig, gram_home: str | Path) -> str:
    """cfg.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<gram_home>/mlflow.db (absolute)."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    env_uri = _user_env_uri()
    if env_uri:
        return env_uri
    home = Path(gram_home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class TrackingServerUnreachable(RuntimeError):
    """The MLflow tracking server did not answer; raised before anything runs."""


def check_tracking_server(uri: str, attempts: int = 3, timeout_s: float = 5.0, backoff_s: float = 1.0) -> None:
    """For an http(s) tracking URI, GET <uri>/health (``attempts`` tries with growing pauses); raise
    ``TrackingServerUnreachable`` with what to do when no try gets an answer. Other URIs need no server."""
    if not is_http(uri):
        return
    import requests

    shown = redact(uri)  # first: it learns the credential, which the error text below may quote in pieces

    last = ""
    for attempt in range(attempts):
        try:
            response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
            if response.status_code < 500:  # 200, or 401/403/404 from a proxy: a server is there
                return
            last = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}: {redact(str(exc))[:200]}"
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2 ** attempt)
    raise TrackingServerUnreachable(
        f"MLflow tracking server {shown} is unreachable after {attempts} tries ({last}); nothing was run. "
        "Start the server, fix mlflow.tracking_uri / MLFLOW_TRACKING_URI, or unset both to use the local "
        "sqlite store under GRAM_HOME.")


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run, or None when there is no UI server behind the tracking URI."""
    if not is_http(tracking_uri):
        return None
    return f"{redact(tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(tracking_uri: str, name: str, version: str) -> str | None:
    """The MLflow UI page of a registered model version, or None without a UI server."""
    if not is_http(tracking_uri):
        return None
    return f"{redact(tracking_uri).rstrip('/')}/#/models/{name}/versions/{version}"


def ensure_experiment(cfg: MlflowConfig, gram_home: str | Path) -> tuple[str, str]:
    """Point MLflow at the resolved tracking URI and return (tracking_uri, experiment_id).

    The experiment is created if missing, with artifacts in <gram_home>/mlartifacts (a server decides its
    own artifact root, so for http URIs the location is left to it). A deleted experiment is restored.
    """
    uri = resolve_tracking_uri(cfg, gram_home)
    check_tracking_server(uri)
    use_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        location = None if is_http(uri) else (Path(gram_home).expanduser().resolve() / "mlartifacts").as_uri()
        try:
            return uri, client.create_experiment(cfg.experiment, artifact_location=location)
        except MlflowException:
            # Another process created it between our lookup and create.
            experiment = client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return uri, experiment.experiment_id


@contextlib.contextmanager
def start_pipeline_run(cfg: MlflowConfig, gram_home: str | Path, run_name: str,
                       params: Mapping[str, Any] | None = None,
                       tags: Mapping[str, Any] | None = None) -> Iterator[RunHandle]:
    """Parent run of one pipeline run; params are flattened (see ``log_params_flat``).

    The run ends FINISHED on normal exit and FAILED when the body raises (MLflow's context manager).
    """
    uri, experiment_id = ensure_experiment(cfg, gram_home)
    with mlflow.start_run(experiment_id=experiment_id, run_name=redact(run_name), tags=_fit_tags(tags)) as run:
        handle = RunHandle(run.info.run_id, experiment_id, uri, run_url(uri, experiment_id, run.info.run_id))
        if params:
            log_params_flat(params, run_id=handle.run_id)
        yield handle


@contextlib.contextmanager
def stage_run(stage_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, *, parent: RunHandle | None = None) -> Iterator[RunHandle]:
    """Nested child run for one stage, under ``parent`` (or this thread's active run when None)."""
    if parent is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError(f"stage_run({stage_name!r}): no active MLflow run in this thread; call it inside "
                               "start_pipeline_run(...) or pass parent=<RunHandle from start_pipeline_run>")
        uri = mlflow.get_tracking_uri()
        parent = RunHandle(active.info.run_id, active.info.experiment_id, uri, None)
    elif mlflow.get_tracking_uri() != parent.tracking_uri:
        use_tracking_uri(parent.tracking_uri)
    all_tags = _fit_tags({"gram.stage": stage_name, **(tags or {})})
    with mlflow.start_run(experiment_id=parent.experiment_id, run_name=redact(stage_name), nested=True,
                          parent_run_id=parent.run_id, tags=all_tags) as run:
        handle = RunHandle(run.info.run_id, parent.experiment_id, parent.tracking_uri,
                           run_url(parent.tracking_uri, parent.experiment_id, run.info.run_id))
        if params:
            log_params_flat(params, run_id=handle.run_id)
        yield handle


def _run_id(run_id: str | None, caller: str) -> str:
    if run_id:
        return run_id
    active = mlflow.active_run()
    if active is None:
        raise RuntimeError(f"{caller}: no run_id given and no active MLflow run in this thread "
                           "(use start_pipeline_run / stage_run, or pass run_id)")
    return active.info.run_id


def flatten(data: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; dataclass configs are turned into dicts first."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, sep, name))
        else:
            out[name] = value
    return out


def _fit_key(key: str) -> str:
    """Characters MLflow rejects become '_'; keys over its length limit keep their head plus a short hash of
    the whole, so they stay unique."""
    key = _BAD_KEY_CHARS.sub("_", key)
    if len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{key[: MAX_ENTITY_KEY_LENGTH - 9]}-{digest}"


def _fit_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {_fit_key(k): _fit_value(v, MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()}


def _fit_value(value: Any, limit: int) -> str:
    """The value as text, credentials in URIs redacted, cut to ``limit``."""
    text = value if isinstance(value, str) else json.dumps(value, default=str) if isinstance(
        value, (list, tuple, dict)) else str(value)
    text = redact(text)
    return text if len(text) <= limit else text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def log_params_flat(params: Mapping[str, Any], run_id: str | None = None) -> dict[str, str]:
    """Log nested params flattened with dots; values over MLflow's 6000-char limit are truncated.

    Returns the {key: value} strings actually logged. Re-logging a key with a different value is an MLflow
    error (params are immutable).
    """
    rid = _run_id(run_id, "log_params_flat")
    logged = {_fit_key(k): _fit_value(v, MAX_PARAM_VAL_LENGTH) for k, v in flatten(params).items()}
    items = [Param(k, v) for k, v in logged.items()]
    client = MlflowClient()
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(rid, params=items[start: start + MAX_PARAMS_TAGS_PER_BATCH])
    return logged


def set_tags(tags: Mapping[str, Any], run_id: str | None = None) -> None:
    """Run tags (values truncated to MLflow's 8000-char limit)."""
    rid = _run_id(run_id, "set_tags")
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(rid, _fit_key(key), _fit_value(value, MAX_TAG_VAL_LENGTH))


# Text artifacts are redacted on the way out (a summary or report may name a store or tracking URI).
_TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".yaml", ".yml", ".csv", ".html", ".log")


def _as_metric_value(value: Any, where: str) -> float:
    """Real numbers (bools as 0/1) -> float; anything else is an error naming where it came from."""
    if not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: metric value {value!r} is not a number (expected int or float)")
    return float(value)


def _log_metrics(rid: str, metrics: list[Metric]) -> None:
    _log_metrics_with(MlflowClient(), rid, metrics)


def _log_metrics_with(client: MlflowClient, rid: str, metrics: list[Metric]) -> None:
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(rid, metrics=metrics[start: start + MAX_METRICS_PER_BATCH])


def log_metric_history(history: Sequence[Mapping[str, Any]], run_id: str | None = None,
                       prefix: str = "train", step_key: str = "step") -> int:
    """Log a training history [{step: 3, loss: 0.7, ...}, ...] in batches; returns how many points.

    Keys without a '/' get ``prefix/`` (loss -> train/loss); keys that already have a split keep it.
    None values are skipped (metric not measured at that step); non-finite values are logged as-is so a
    divergence stays visible.
    """
    rid = _run_id(run_id, "log_metric_history")
    now = int(time.time() * 1000)
    metrics: list[Metric] = []
    for index, row in enumerate(history):
        if step_key not in row:
            raise ValueError(f"log_metric_history: row {index} has no {step_key!r} key (keys: {sorted(row)})")
        step = int(row[step_key])
        for key, value in row.items():
            if key == step_key or value is None:
                continue
            name = key if "/" in key or not prefix else f"{prefix}/{key}"
            metrics.append(Metric(_fit_key(name), _as_metric_value(value, f"history row {index} key {key!r}"),
                                  now, step))
    _log_metrics(rid, metrics)
    return len(metrics)


def step_logger(handle: RunHandle) -> Callable[[int, Mapping[str, Any]], None]:
    """log_step(step, metrics): one training step's numbers to run ``handle`` as they happen (rank 0 of a Ray
    worker calls it after every logged step). Keys are named as in ``log_metric_history``. A failed write
    is logged and skipped: the metrics also reach metrics.jsonl, and live logging must not stop training."""
    client = MlflowClient(handle.tracking_uri)

    def log_step(step: int, metrics: Mapping[str, Any]) -> None:
        now = int(time.time() * 1000)
        items = [Metric(_fit_key(key if "/" in key else f"train/{key}"), float(value), now, int(step))
                 for key, value in metrics.items()
                 if key != "step" and isinstance(value, numbers.Real)]
        try:
            _log_metrics_with(client, handle.run_id, items)
        except Exception as err:  # noqa: BLE001 - see docstring
            _log.warning("live metrics for step %d not logged to run %s: %s", step, handle.run_id, err)

    return log_step


def log_eval_metrics(metrics: Mapping[str, Any], run_id: str | None = None, step: int = 0) -> dict[str, float]:
    """Log final evaluation metrics (nested dicts flattened with '/', e.g. rewardbench/chat_hard)."""
    rid = _run_id(run_id, "log_eval_metrics")
    now = int(time.time() * 1000)
    flat = {_fit_key(k): _as_metric_value(v, f"eval metric {k!r}")
            for k, v in flatten(metrics, sep="/").items() if v is not None}
    _log_metrics(rid, [Metric(k, v, now, step) for k, v in flat.items()])
    return flat


def log_artifact_file(path: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> str:
    """Upload one local file (or folder) to the run's artifacts; returns its artifact URI."""
    rid = _run_id(run_id, "log_artifact_file")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"log_artifact_file: {path} does not exist")
    client = MlflowClient()
    with _redacted_copy(path) as upload:
        if upload.is_dir():
            client.log_artifacts(rid, str(upload), artifact_path)
        else:
            client.log_artifact(rid, str(upload), artifact_path)
    root = client.get_run(rid).info.artifact_uri.rstrip("/")
    return "/".join(p for p in (root, artifact_path, path.name) if p)



@contextlib.contextmanager
def _redacted_copy(path: Path) -> Iterator[Path]:
    """``path`` itself when no text file in it names a credential, else a temporary copy with them redacted."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    dirty = {}
    for file in files:
        if file.suffix.lower() in _TEXT_SUFFIXES:
            text = file.read_text(errors="replace")
            if redact(text) != text:
                dirty[file] = redact(text)
    if not dirty:
        yield path
        return
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gram-redacted-") as tmp:
        copy = Path(tmp) / path.name
        if path.is_dir():
            shutil.copytree(path, copy)
        else:
            shutil.copy2(path, copy)
        for file, text in dirty.items():
            (copy / file.relative_to(path) if path.is_dir() else copy).write_text(text)
        yield copy
