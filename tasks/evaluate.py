"""Evaluation tasks: score a judge on the eval set (both orders), then write the comparison report.

``evaluate`` runs once per model (the trained judge, and the base model zero-shot when configured), so a
changed fine-tuning config re-scores only the trained judge; ``eval_report`` combines the two.
"""

from __future__ import annotations

import json

from prefect import task

from gram_core.config import JudgeConfig, ModelConfig
from tasks.artifacts import ArtifactRef, ArtifactStore, read_table_artifact, write_table_artifact
from tasks.caching import STAGE_CACHE_POLICY, stage_logger
from tasks.stages import ProgressLog, base_model_dir, model_folder, model_label

REPORT_FILE = "report.md"
CHART_FILE = "chart.png"
METRICS_FILE = "metrics.json"


def make_judge(folder: str, config: JudgeConfig, dtype: str = "float32"):
    """The scorer a model folder calls for: a GRAM judge (its recorded judge settings applied), a base model
    zero-shot, or a Bradley-Terry reward model (scalar rewards, one order)."""
    from gram_core.scorers import load_scorer

    return load_scorer(folder, config, dtype)


@task(name="evaluate", cache_policy=STAGE_CACHE_POLICY, persist_result=True)
def evaluate(model: ArtifactRef | ModelConfig, eval_set: ArtifactRef, judge: JudgeConfig, label: str,
             store_uri: str) -> ArtifactRef:
    """Scores (both orders) of one model on the eval set, as a scores-contract table artifact.

    ``model``: a trained model artifact, or a ModelConfig for the base model zero-shot.
    """
    from data_contracts import SCORES
    from gram_core.scorers import score_table
    from tasks.report import ACCURACY, eval_metrics

    log = stage_logger()
    store = ArtifactStore(store_uri)
    if isinstance(model, ModelConfig):
        folder, dtype, name = base_model_dir(model), model.dtype, model.source
    else:
        folder, dtype, name = model_folder(store_uri, model), "float32", model_label(model)
    table = read_table_artifact(store, eval_set)
    scorer = make_judge(folder, judge, dtype)
    log.info("evaluate %s (%s): scoring %d pairs in both orders", label, name, table.num_rows)
    scores = score_table(scorer, table, progress=ProgressLog(log, f"evaluate {label}"))
    metrics = eval_metrics(scores)
    ref = write_table_artifact(store, "evaluate", scores, SCORES,
                              meta={"label": label, "model": name, "eval_set": eval_set.sha256, "metrics": metrics})
    log.info("evaluate %s: accuracy %.3f, position consistency %s -> %s", label, metrics[ACCURACY],
             metrics.get("rewardbench/position_consistency"), ref.uri)
    return ref


@task(name="eval_report", cache_policy=STAGE_CACHE_POLICY, persist_result=True)
def eval_report(trained: ArtifactRef, base: ArtifactRef | None, eval_set: ArtifactRef, store_uri: str,
                eval_name: str = "eval set", base_name: str = "base model (zero-shot)") -> ArtifactRef:
    """report.md + chart.png + metrics.json comparing the base model zero-shot with the trained judge."""
    from tasks.report import eval_metrics, report_markdown, write_chart

    store = ArtifactStore(store_uri)
    trained_scores = read_table_artifact(store, trained)
    base_scores = read_table_artifact(store, base) if base is not None else None
    trained_metrics = eval_metrics(trained_scores)
    base_metrics = eval_metrics(base_scores) if base_scores is not None else None
    with store.staging("eval_report") as folder:
        (folder / REPORT_FILE).write_text(report_markdown(trained_scores, base_scores, eval_name=eval_name,
                                                              base_name=base_name))
        write_chart(folder / CHART_FILE, trained_metrics, base_metrics)
        (folder / METRICS_FILE).write_text(json.dumps({"trained": trained_metrics, "base": base_metrics},
                                                      indent=1, sort_keys=True))
        ref = store.publish("eval_report", folder, "report",
                            meta={"trained": trained_metrics, "base": base_metrics, "eval_set": eval_set.sha256,
                                  "eval_rows": eval_set.rows})
    stage_logger().info("eval_report -> %s", ref.file(REPORT_FILE))
    return ref
