"""Register the judge in MLflow (promotion gate included), and fetch a registered judge to train further.

The run's record (stage child runs, the summary) is ``tasks.store.run_record``; the registry itself
(``log_and_register``, aliases, the gate) is ``tasks.on_mlflow.model_registry``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from gram_core.config import JudgeConfig
from tasks.on_mlflow.model_registry import download_registered_model
from tasks.on_mlflow.tracking import RunHandle
from tasks.redaction import scrub_errors
from tasks.retries import REGISTRY_RETRIES
from tasks.settings import MlflowConfig, StatePaths
from tasks.store.artifacts import ArtifactRef, open_store
from tasks.store.caching import code_version, stage_logger
from tasks.store.run_record import StageRecord

PROMOTION_FIELDS = ("decision", "reason", "candidate_score", "champion_version", "champion_score", "margin")


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
@scrub_errors
def register(model: ArtifactRef, report: ArtifactRef, eval_set: ArtifactRef, mlflow: MlflowConfig,
             judge: JudgeConfig, tags: dict[str, str], state: StatePaths,
             tracking: RunHandle | None = None) -> dict[str, Any]:
    """Register the judge (a new version, or the existing one with the same content), alias candidate, gate."""
    from tasks.on_mlflow import model_registry
    from tasks.on_mlflow import tracking as mlf
    from tasks.store.artifacts import read_table_artifact

    log = stage_logger()
    store = open_store(state)
    folder = store.local_dir(model)
    metrics = dict(report.meta["trained"])
    eval_id = eval_set_id(read_table_artifact(store, eval_set), judge)
    all_tags = {**tags, "report_sha256": report.sha256, "eval_set_sha256": eval_set.sha256}
    params = {"model_artifact": model.uri, "eval_set": eval_set.uri, "mlflow": dataclasses.asdict(mlflow)}
    if tracking is None:  # run alone (e.g. the register flow): a run of its own
        context = mlf.start_pipeline_run(mlflow, state.home, "register", params=params, tags={"gram.stage": "register"})
    else:
        context = mlf.stage_run("register", params=params, tags={"gram.cached": "false"}, parent=tracking)
    with context as run:
        reg = model_registry.log_and_register(folder, mlflow, metrics, all_tags, eval_id, judge_config=judge,
                                        model_sha256=model.sha256)
    decision = reg.promotion
    log.info("%s %s version %s (candidate); champion gate: %s — %s",
             "same model content as" if reg.reused else "registered", reg.name, reg.version,
             decision.decision, decision.reason)
    return {"name": reg.name, "version": reg.version, "model_uri": reg.model_uri, "run_id": run.run_id,
            "url": reg.url, "tracking_uri": run.tracking_uri, "reused": reg.reused,
            "promotion": {k: getattr(decision, k) for k in PROMOTION_FIELDS}}


@task(name="fetch_registered_model", cache_policy=NO_CACHE, **REGISTRY_RETRIES)
@scrub_errors
def fetch_registered_model(model_uri: str, mlflow: MlflowConfig, state: StatePaths) -> ArtifactRef:
    """A registered judge (by alias or version) as a model artifact in the store, to fine-tune further."""
    import shutil
    import tempfile

    from tasks.on_mlflow import tracking as mlf

    store = open_store(state)
    with tempfile.TemporaryDirectory(prefix="gram-registered-") as tmp, store.staging("registered") as folder:
        source, resolved = download_registered_model(model_uri, mlf.resolve_tracking_uri(mlflow, state.home), Path(tmp))
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
