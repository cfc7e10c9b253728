"""The quality study's report task: every arm's scores side by side (table, PNG, metrics), one MLflow run each."""

from __future__ import annotations

import json

from prefect import task

from gram_core.artifact_files import STUDY_CHART, STUDY_FILE, STUDY_METRICS
from tasks.redaction import scrub_errors
from tasks.settings import StatePaths
from tasks.store.artifacts import ArtifactRef, open_store, read_history, read_table_artifact
from tasks.store.caching import STAGE_CACHE_POLICY, stage_logger


@task(name="study_report", cache_policy=STAGE_CACHE_POLICY, persist_result=True)
@scrub_errors
def study_report(scores: dict[str, ArtifactRef], eval_set: ArtifactRef, state: StatePaths, eval_name: str,
                 models: dict[str, ArtifactRef] | None = None) -> ArtifactRef:
    """quality.md + quality.png + metrics.json over the arms' scores tables (arm name -> scores artifact) and
    the training curves of ``models`` (arm name, or "stage1", -> model artifact)."""
    from gram_core.study_report import study_readout, write_study_chart

    store = open_store(state)
    tables = {arm: read_table_artifact(store, ref) for arm, ref in scores.items()}
    histories = {name: read_history(store.local_dir(ref)) for name, ref in (models or {}).items()}
    readout = study_readout(tables, read_table_artifact(store, eval_set), histories, eval_name)
    metrics = readout["arms"]
    with store.staging("study_report") as folder:
        (folder / STUDY_FILE).write_text(readout["markdown"])
        write_study_chart(folder / STUDY_CHART, metrics)
        (folder / STUDY_METRICS).write_text(json.dumps({k: v for k, v in readout.items() if k != "markdown"},
                                                       indent=1, sort_keys=True))
        ref = store.publish("study_report", folder, "report",
                            meta={"arms": {a: {"overall": m["overall"], "accuracy": m["accuracy"], "ece": m["ece"],
                                               "position_consistency": m["position_consistency"]}
                                           for a, m in metrics.items()},
                                  "eval_set": eval_set.sha256, "eval_rows": eval_set.rows,
                                  # what bench/study_render.py reads to render this report again
                                  "inputs": {"scores": {a: r.sha256 for a, r in scores.items()},
                                             "models": {n: r.sha256 for n, r in (models or {}).items()}}})
    stage_logger().info("study_report -> %s", ref.file(STUDY_FILE))
    return ref


@task(name="record_study")
@scrub_errors
def record_study(report: ArtifactRef, models: dict[str, ArtifactRef], scores: dict[str, ArtifactRef], state: StatePaths,
                 tracking, dropped: dict[str, dict] | None = None) -> None:
    """One MLflow child run per arm (its training curve, its eval metrics) and the report on the study run;
    ``dropped`` (source role -> ``dropped_summary``): the rows drop_invalid_rows left out, as params of the study run."""
    from gram_core.sources import dropped_params
    from tasks.on_mlflow import tracking as mlf

    drops = {k: v for role, summary in (dropped or {}).items() for k, v in dropped_params(role, summary).items()}
    if drops:
        mlf.log_params_flat(drops, run_id=tracking.run_id)

    store = open_store(state)
    saved = json.loads(store.read_text(report, STUDY_METRICS))
    for arm, arm_metrics in saved["arms"].items():
        tags = {"gram.arm": arm, "gram.scores": scores[arm].uri}
        if arm in models:
            tags["gram.model"] = models[arm].uri
        with mlf.stage_run(f"arm:{arm}", tags=tags, parent=tracking) as run:
            if arm in models:
                history = read_history(store.local_dir(models[arm]))
                if history:
                    mlf.log_metric_history(history, run_id=run.run_id)
            flat = {"study/overall": arm_metrics["overall"], "study/accuracy": arm_metrics["accuracy"],
                    "study/ece": arm_metrics["ece"],
                    "study/position_consistency": arm_metrics["position_consistency"],
                    **{f"study/{k}": v for k, v in arm_metrics["sections"].items()},
                    **{f"study/subset/{k}": v for k, v in arm_metrics["subsets"].items()}}
            mlf.log_eval_metrics({k.replace(" ", "_").lower(): v for k, v in flat.items()}, run_id=run.run_id)
    differences = {f"study/{name.replace(' - ', '_minus_')}/{column}".replace(" ", "_").lower(): d["value"]
                   for name, diff in saved["differences"].items() for column, d in diff.items()}
    if differences:
        mlf.log_eval_metrics(differences, run_id=tracking.run_id)
    folder = store.local_dir(report)
    for name in (STUDY_FILE, STUDY_CHART, STUDY_METRICS):
        mlf.log_artifact_file(folder / name, run_id=tracking.run_id)
