"""Register the judge in MLflow (gate included), record every stage as a child run, summarise the run.

MLflow layout of one pipeline run: a parent run (opened by the flow with ``tasks.tracking.start_pipeline_run``)
holding the resolved config, code version, data hashes, the eval metrics and the report; one child run per
stage. Training stages that compute open their child run themselves and log every step live from Ray's
rank 0; cached stages get theirs here, from their artifact references, after the stages finish (tag
``gram.cached``): a cached stage still shows its params, per-step training metrics (from the model's
metrics.jsonl) and eval metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from gram_core.config import JudgeConfig
from tasks.artifacts import ArtifactRef, ArtifactStore
from tasks.caching import code_version, stage_logger
from tasks.evaluate import CHART_FILE, METRICS_FILE, REPORT_FILE
from tasks.registry import current_aliases, download_registered_model
from tasks.retries import REGISTRY_RETRIES
from tasks.settings import MlflowConfig
from tasks.stages import METRICS_FILE as TRAIN_METRICS_FILE
from tasks.tracking import RunHandle

# Stages whose task opens its own child run when it computes (cached ones are recorded by record_run).
LIVE_STAGES = ("pretrain", "finetune", "register")
PROMOTION_FIELDS = ("decision", "reason", "candidate_score", "champion_version", "champion_score", "margin")


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


# Rows and judge settings that decide a score on the eval set (batch size and prefix reuse do not).
EVAL_ROW_COLUMNS = ("id", "subset", "prompt", "chosen", "rejected")
JUDGE_SCORE_FIELDS = ("max_length", "label_a", "label_b")


def eval_set_id(table: Any, judge: JudgeConfig) -> str:
    """The gate's eval-set identity: the canonical rows (ids, subsets, texts) plus the judge settings that
    change scores; independent of how the Parquet file was written (pyarrow version, compression)."""
    from data_contracts import rows_sha256

    settings = json.dumps({k: getattr(judge, k) for k in JUDGE_SCORE_FIELDS}, sort_keys=True)
    text = f"{rows_sha256(table, EVAL_ROW_COLUMNS)}\0{settings}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Never cached: registration is a side effect on a registry the cache key cannot see (a new tracking URI
# must get its version). It is idempotent by model content instead, which also makes its retries safe.
@task(name="register", cache_policy=NO_CACHE, **REGISTRY_RETRIES)
def register(model: ArtifactRef, report: ArtifactRef, eval_set: ArtifactRef, mlflow: MlflowConfig,
             judge: JudgeConfig, tags: dict[str, str], home: str, store_uri: str,
             tracking: RunHandle | None = None) -> dict[str, Any]:
    """Register the judge (a new version, or the existing one with the same content), alias candidate, gate."""
    from tasks import registry
    from tasks import tracking as mlf
    from tasks.artifacts import read_table_artifact

    log = stage_logger()
    store = ArtifactStore(store_uri)
    folder = store.local_dir(model)
    metrics = dict(report.meta["trained"])
    eval_id = eval_set_id(read_table_artifact(store, eval_set), judge)
    all_tags = {**tags, "report_sha256": report.sha256, "eval_set_sha256": eval_set.sha256}
    params = {"model_artifact": model.uri, "eval_set": eval_set.uri, "mlflow": dataclasses.asdict(mlflow)}
    if tracking is None:  # run alone (e.g. the register flow): a run of its own
        context = mlf.start_pipeline_run(mlflow, home, "register", params=params, tags={"gram.stage": "register"})
    else:
        context = mlf.stage_run("register", params=params, tags={"gram.cached": "false"}, parent=tracking)
    with context as run:
        reg = registry.log_and_register(folder, mlflow, metrics, all_tags, eval_id, judge_config=judge,
                                        model_sha256=model.sha256)
    decision = reg.promotion
    log.info("%s %s version %s (candidate); champion gate: %s — %s",
             "same model content as" if reg.reused else "registered", reg.name, reg.version,
             decision.decision, decision.reason)
    return {"name": reg.name, "version": reg.version, "model_uri": reg.model_uri, "run_id": run.run_id,
            "url": reg.url, "tracking_uri": run.tracking_uri, "reused": reg.reused,
            "promotion": {k: getattr(decision, k) for k in PROMOTION_FIELDS}}


# MLflow metric prefix of each report column but the GRAM judge's (logged unprefixed).
METRIC_PREFIXES = {"base": "zero_shot", "bt": "bt"}


def report_columns(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, name) of the report's columns, in order (eval_report's meta)."""
    from tasks.report import COLUMNS

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


def _history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k == "step" or isinstance(v, (int, float))} for r in rows if "step" in r]


def _log_stage(record: StageRecord, store: ArtifactStore, parent: RunHandle) -> None:
    from tasks import tracking as mlf

    ref = record.ref
    tags = {"gram.cached": str(record.cached).lower(), "gram.state": record.state}
    params = dict(record.params)
    if ref is not None:
        tags.update({"gram.artifact": ref.uri, "gram.sha256": ref.sha256})
        params.update({f"out.{k}": v for k, v in ref.meta.items() if not isinstance(v, dict)})
    with mlf.stage_run(record.name, params=params, tags=tags, parent=parent) as run:
        if ref is None:
            return
        if ref.kind == "model":
            history = _history(store.local_dir(ref) / TRAIN_METRICS_FILE)
            if history:
                mlf.log_metric_history(history, run_id=run.run_id)
        elif ref.kind == "table" and ref.contract == "scores":
            mlf.log_eval_metrics(ref.meta.get("metrics", {}), run_id=run.run_id)
        elif ref.kind == "report":
            folder = store.local_dir(ref)
            mlf.log_eval_metrics(report_metrics(ref.meta), run_id=run.run_id)
            for name in (REPORT_FILE, CHART_FILE, METRICS_FILE):
                mlf.log_artifact_file(folder / name, run_id=run.run_id)


@task(name="record_run")
def record_run(records: list[StageRecord], report: ArtifactRef, registration: dict[str, Any] | None,
               store_uri: str, tracking: RunHandle) -> None:
    """Child runs for the stages (cached ones included) and the outcome on the parent run."""
    from tasks import tracking as mlf

    store = ArtifactStore(store_uri)
    for record in records:
        if record.name in LIVE_STAGES and not record.cached:
            continue  # the task wrote its own child run (register: the model; training: live metrics)
        _log_stage(record, store, tracking)
    mlf.log_eval_metrics(report_metrics(report.meta), run_id=tracking.run_id)
    folder = store.local_dir(report)
    for name in (REPORT_FILE, CHART_FILE):
        mlf.log_artifact_file(folder / name, run_id=tracking.run_id)
    tags = {f"gram.data.{r.name}": r.ref.sha256 for r in records if r.ref is not None}
    if registration:
        tags.update({"gram.registered_model": registration["name"],
                     "gram.registered_version": registration["version"]})
    mlf.set_tags(tags, run_id=tracking.run_id)


def pipeline_params(config: Any) -> dict[str, Any]:
    """Parent-run params: the resolved config (flattened by the tracker) and the code version."""
    return {"config": dataclasses.asdict(config), "code_version": code_version()}


@task(name="summarize")
def summarize(report: ArtifactRef, registration: dict[str, Any] | None, records: list[StageRecord],
              store_uri: str, tracking: RunHandle | None) -> dict[str, Any]:
    """The run's outcome as a dict (printed by `gram run`), also published as Prefect artifacts. ``columns``:
    the compared models, key -> name, in order (zero-shot | BT | GRAM); ``eval``: one row per metric with
    each column's value under its key (a fraction, None, or "n/a (scalar)")."""
    from gram_core.evidence import evidence_lines
    from tasks.report import comparison_rows
    from tasks.tracking import redact

    columns = dict(report_columns(report.meta))
    rows = comparison_rows({key: report.meta[key] for key in columns})
    summary: dict[str, Any] = {
        "columns": columns,
        "eval": [{"metric": r["name"], **r["values"]} for r in rows],
        "eval_rows": report.meta.get("eval_rows"),
        "evidence": evidence_lines(report.meta["evidence"]) if report.meta.get("evidence") else [],
        "report": report.file(REPORT_FILE),
        "chart": report.file(CHART_FILE),
        "stages": {r.name: r.state for r in records},
        "mlflow_run": tracking.url or tracking.run_id if tracking else None,
        "tracking_uri": redact(tracking.tracking_uri) if tracking else None,
        "artifact_store": redact(store_uri),
    }
    if registration:
        summary["registered"] = {**registration, "tracking_uri": redact(registration["tracking_uri"]),
                                 "aliases": current_aliases(registration["name"], registration["version"],
                                                            registration["tracking_uri"])}
    publish_prefect_artifacts(summary, ArtifactStore(store_uri).read_text(report, REPORT_FILE))
    return summary


def publish_prefect_artifacts(summary: dict[str, Any], report_md: str) -> None:
    """Eval table + report with links to MLflow, visible on the flow run page in the Prefect UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    def pct(value: float | str | None) -> str:
        return value if isinstance(value, str) else "—" if value is None else f"{100 * value:.1f}"

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


@task(name="fetch_registered_model", cache_policy=NO_CACHE, **REGISTRY_RETRIES)
def fetch_registered_model(model_uri: str, mlflow: MlflowConfig, home: str, store_uri: str) -> ArtifactRef:
    """A registered judge (by alias or version) as a model artifact in the store, to fine-tune further."""
    import shutil
    import tempfile

    from tasks import tracking as mlf

    store = ArtifactStore(store_uri)
    with tempfile.TemporaryDirectory(prefix="gram-registered-") as tmp, store.staging("registered") as folder:
        source, resolved = download_registered_model(model_uri, mlf.resolve_tracking_uri(mlflow, home), Path(tmp))
        shutil.copytree(source, folder, dirs_exist_ok=True)
        ref = store.publish("registered", folder, "model", meta={"model_uri": resolved})
    stage_logger().info("%s is %s -> %s", model_uri, resolved, ref.uri)
    return ref


def version_tags(config: Any, records: list[StageRecord]) -> dict[str, str]:
    """Registry version tags: the training config hash, the input data hashes, code version, preset."""
    from gram_core.config import config_hash

    training = "-".join(config_hash(c) for c in (config.model, config.encode, config.pretrain, config.finetune))
    tags = {"config_hash": training, "code_version": code_version(), "preset": config.preset}
    tags.update({f"data.{r.name}": r.ref.sha256[:16] for r in records if r.ref is not None and r.ref.kind == "table"
                 and r.ref.contract != "scores"})
    return tags
