"""The run's record: every stage as an MLflow child run (cached ones from their artifacts), the outcome on the
parent run, and the run summary (printed by `gram run`, published as Prefect artifacts).

MLflow layout of one pipeline run: a parent run (opened by the flow with ``tasks.on_mlflow.tracking.start_pipeline_run``)
holding the resolved config, code version, data hashes, the eval metrics and the report; one child run per
stage. Training stages that compute open their child run themselves and log every step live from Ray's
rank 0; cached stages get theirs here, from their artifact references, after the stages finish (tag
``gram.cached``): a cached stage still shows its params, per-step training metrics (from the model's
training history) and eval metrics.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from prefect import task

from gram_core.artifact_files import CHART_FILE, EVAL_METRICS_FILE, REPORT_FILE
from gram_core.comparison_report import COLUMNS
from gram_core.report import pct
from gram_core.sources import DROPPED_ROWS, dropped_params
from tasks.on_mlflow import tracking as mlf
from tasks.on_mlflow.model_registry import current_aliases
from tasks.on_mlflow.tracking import RunHandle
from tasks.redaction import redact, redact_value, scrub_errors
from tasks.settings import StageSettings, StatePaths
from tasks.store.artifacts import ArtifactRef, ArtifactStore, open_store, read_history
from tasks.store.caching import code_version

TRAINED_STAGES = {"finetune": "trained", "bradley_terry": "bt"}  # stage -> its column key in the summary


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """One stage as the flow saw it: its output, whether Prefect served it from cache, its config."""

    name: str
    ref: ArtifactRef | None
    state: str  # Prefect state name: Completed, Cached, ...
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def cached(self) -> bool:
        return self.state == "Cached"


def record_params(task: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A stage's params, read off the call itself: each config argument by its parameter name, and a
    training stage's ``StageSettings`` as its own params (model, train, encode, ray)."""
    bound = inspect.signature(task.fn).bind_partial(*args, **kwargs).arguments
    params: dict[str, dict[str, Any]] = {}
    for name, value in bound.items():
        if isinstance(value, StageSettings):
            params.update({k: dataclasses.asdict(v) for k, v in value.params().items()})
        elif dataclasses.is_dataclass(value) and not isinstance(value, (ArtifactRef, StatePaths)):
            params[name] = dataclasses.asdict(value)
    return params


def pipeline_params(config: Any) -> dict[str, Any]:
    """Parent-run params: the resolved config (flattened by the tracker) and the code version."""
    return {"config": dataclasses.asdict(config), "code_version": code_version()}


# MLflow metric prefix of each report column but the GRAM judge's (logged unprefixed).
METRIC_PREFIXES = {"base": "zero_shot", "bt": "bt"}


def report_columns(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, name) of the report's columns, in order (eval_report's meta)."""

    pairs = meta.get("columns") or [[k, COLUMNS[k]] for k in ("base", "trained") if meta.get(k)]
    return [(key, name) for key, name in pairs if meta.get(key)]


def report_metrics(meta: Mapping[str, Any]) -> dict[str, float]:
    """The report's metrics for MLflow: the GRAM judge's as they are, every other column's under its prefix
    (zero_shot/..., bt/...)."""
    out = dict(meta["trained"])
    for key, _name in report_columns(meta):
        if key != "trained":
            out.update({f"{METRIC_PREFIXES.get(key, key)}/{k}": v for k, v in meta[key].items()})
    return out


def dropped_rows(records: list[StageRecord]) -> dict[str, dict[str, Any]]:
    """Source role -> what ``drop_invalid_rows`` left out of it (``gram_core.sources.dropped_summary``), for the
    sources read with it on."""
    return {r.ref.meta.get("role", r.name): r.ref.meta[DROPPED_ROWS] for r in records
            if r.ref is not None and isinstance(r.ref.meta.get(DROPPED_ROWS), dict)}


def _log_stage(record: StageRecord, store: ArtifactStore, parent: RunHandle) -> None:
    ref = record.ref
    tags = {"gram.cached": str(record.cached).lower(), "gram.state": record.state}
    params = dict(record.params)
    if ref is not None:
        tags.update({"gram.artifact": ref.uri, "gram.sha256": ref.sha256})
        params.update({f"out.{k}": v for k, v in ref.meta.items() if not isinstance(v, dict)})
        for role, summary in dropped_rows([record]).items():
            params.update(dropped_params(role, summary))
    with mlf.stage_run(record.name, params=params, tags=tags, parent=parent) as run:
        if ref is None:
            return
        if ref.kind == "model":
            history = read_history(store.local_dir(ref))
            if history:
                mlf.log_metric_history(history, run_id=run.run_id)
        elif ref.kind == "table" and ref.contract == "scores":
            mlf.log_eval_metrics(ref.meta.get("metrics", {}), run_id=run.run_id)
        elif ref.kind == "report":
            folder = store.local_dir(ref)
            mlf.log_eval_metrics(report_metrics(ref.meta), run_id=run.run_id)
            for name in (REPORT_FILE, CHART_FILE, EVAL_METRICS_FILE):
                mlf.log_artifact_file(folder / name, run_id=run.run_id)


@task(name="record_run")
@scrub_errors
def record_run(records: list[StageRecord], report: ArtifactRef, registration: dict[str, Any] | None,
               state: StatePaths, tracking: RunHandle) -> None:
    """Child runs for the stages (cached ones included) and the outcome on the parent run."""
    from gram_core import stages

    store = open_store(state)
    live = stages.LIVE_STAGES  # stages whose task opens its own child run when it computes
    for record in records:
        if record.name in live and not record.cached:
            continue  # the task wrote its own child run (register: the model; training: live metrics)
        _log_stage(record, store, tracking)
    mlf.log_eval_metrics(report_metrics(report.meta), run_id=tracking.run_id)
    drops = {k: v for role, summary in dropped_rows(records).items() for k, v in dropped_params(role, summary).items()}
    if drops:  # dropped_rows.<role> and dropped_rows.<role>.<rule>: rows left out by drop_invalid_rows
        mlf.log_params_flat(drops, run_id=tracking.run_id)
    folder = store.local_dir(report)
    for name in (REPORT_FILE, CHART_FILE):
        mlf.log_artifact_file(folder / name, run_id=tracking.run_id)
    tags = {f"gram.data.{r.name}": r.ref.sha256 for r in records if r.ref is not None}
    if registration:
        tags.update({"gram.registered_model": registration["name"],
                     "gram.registered_version": registration["version"]})
    mlf.set_tags(tags, run_id=tracking.run_id)


@task(name="summarize")
@scrub_errors
def summarize(report: ArtifactRef, registration: dict[str, Any] | None, records: list[StageRecord],
              state: StatePaths, tracking: RunHandle | None) -> dict[str, Any]:
    """The run's outcome as a dict (printed by `gram run`), also published as Prefect artifacts. ``columns``:
    the compared models, key -> name, in order (zero-shot | BT | GRAM); ``eval``: one row per metric with
    each column's value under its key (a fraction, None, or "n/a (scalar)")."""
    from gram_core.comparison_report import comparison_rows
    from gram_core.evidence import evidence_lines
    from gram_core.study_report import training_lines, training_summary

    columns = dict(report_columns(report.meta))
    rows = comparison_rows({key: report.meta[key] for key in columns})
    store = open_store(state)
    training = {TRAINED_STAGES[r.name]: training_summary(read_history(store.local_dir(r.ref)))
                for r in records if r.name in TRAINED_STAGES and r.ref is not None}
    summary: dict[str, Any] = {
        "columns": columns,
        "eval": [{"metric": r["name"], **r["values"]} for r in rows],
        "eval_rows": report.meta.get("eval_rows"),
        DROPPED_ROWS: dropped_rows(records),
        "evidence": evidence_lines(report.meta["evidence"]) if report.meta.get("evidence") else [],
        "training": training_lines(training, {key: columns.get(key, COLUMNS.get(key, key)) for key in training}),
        "report": report.file(REPORT_FILE),
        "chart": report.file(CHART_FILE),
        "stages": {r.name: r.state for r in records},
        "mlflow_run": tracking.url or tracking.run_id if tracking else None,
        "tracking_uri": redact(tracking.tracking_uri) if tracking else None,
        "artifact_store": redact(state.artifact_store),
    }
    if registration:
        summary["registered"] = {**registration, "tracking_uri": redact(registration["tracking_uri"]),
                                 "aliases": current_aliases(registration["name"], registration["version"],
                                                            registration["tracking_uri"])}
    summary = redact_value(summary)  # what is printed, returned to Prefect (its result) and published
    publish_prefect_artifacts(summary, redact(open_store(state).read_text(report, REPORT_FILE)))
    return summary


def publish_prefect_artifacts(summary: dict[str, Any], report_md: str) -> None:
    """Eval table + report with links to MLflow, visible on the flow run page in the Prefect UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    columns = summary["columns"]
    table = [{"metric": r["metric"], **{name: pct(r.get(key)) for key, name in columns.items()}}
             for r in summary["eval"]]
    create_table_artifact(table, key="gram-eval", description=f"Eval accuracy (%): {' | '.join(columns.values())}")
    links = [f"* Artifact store: `{summary['artifact_store']}`", f"* Report: `{summary['report']}`",
             f"* MLflow run: {summary['mlflow_run']} (tracking URI `{summary['tracking_uri']}`)"]
    reg = summary.get("registered")
    if reg:
        where = reg["url"] or f"`{reg['model_uri']}`"
        links.append(f"* Model version: {reg['name']} v{reg['version']} ({', '.join(reg['aliases']) or 'no alias'}) "
                     f"{where}; gate: {reg['promotion']['decision']} — {reg['promotion']['reason']}")
    create_markdown_artifact("\n".join(["## GRAM pipeline run", "", *links, "", report_md]), key="gram-report",
                             description="GRAM evaluation report and links")
