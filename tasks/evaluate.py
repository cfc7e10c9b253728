"""Evaluation tasks: score a judge on the eval set (both orders), then write the comparison report.

``evaluate`` runs once per model (the trained judge, and the base model zero-shot when configured), so a
changed fine-tuning config re-scores only the trained judge; ``eval_report`` combines the two.
"""

from __future__ import annotations

import json

from prefect import task

from gram_core.config import JudgeConfig, ModelConfig
from gram_core.pipeline_config import RayConfig
from tasks.artifacts import ArtifactRef, ArtifactStore, read_table_artifact, write_table_artifact
from tasks.caching import STAGE_CACHE_POLICY, stage_logger
from tasks.stages import ProgressLog, base_model_dir, model_folder, model_label

REPORT_FILE = "report.md"
CHART_FILE = "chart.png"
METRICS_FILE = "metrics.json"


def score_table(folder: str, table, judge: JudgeConfig, actors: int = 0, ray: RayConfig | None = None,
                progress=None):
    """Scores-contract table of ``table`` by the judge in ``folder``: in this process, or fanned out over
    ``actors`` Ray Data actors (the same scores, in the same row order)."""
    if actors:
        from tasks.ray_train import score_pairs_distributed

        return score_pairs_distributed(folder, table, judge, actors, ray or RayConfig())
    from gram_core.judging import load_judge, score_pairs

    return score_pairs(load_judge(folder, judge), table, progress=progress)


@task(name="evaluate", cache_policy=STAGE_CACHE_POLICY, persist_result=True)
def evaluate(model: ArtifactRef | ModelConfig, eval_set: ArtifactRef, judge: JudgeConfig, label: str,
             store_uri: str, actors: int = 0, ray: RayConfig | None = None) -> ArtifactRef:
    """Scores (both orders) of one model on the eval set, as a scores-contract table artifact.

    ``model``: a trained model artifact, or a ModelConfig for the base model zero-shot (scored at the same
    ``judge.dtype`` as the trained one). ``actors`` > 0 fans the scoring out over a Ray cluster.
    """
    from data_contracts import SCORES
    from tasks.report import ACCURACY, eval_metrics

    log = stage_logger()
    store = ArtifactStore(store_uri)
    if isinstance(model, ModelConfig):
        folder, name = base_model_dir(model), model.source
    else:  # fanning out: the actors read the artifact from the store themselves
        folder = store.require(model).uri if actors else model_folder(store_uri, model)
        name = model_label(model)
    table = read_table_artifact(store, eval_set)
    where = f"over {actors} Ray Data actors" if actors else "in process"
    log.info("evaluate %s (%s): scoring %d pairs in both orders, %s", label, name, table.num_rows, where)
    scores = score_table(folder, table, judge, actors, ray, progress=ProgressLog(log, f"evaluate {label}"))
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
