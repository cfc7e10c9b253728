"""Evaluation tasks: score a model on the eval set, then write the comparison report.

``evaluate`` runs once per model (the trained judge; the base model zero-shot and the Bradley-Terry baseline
when configured), so a changed fine-tuning config re-scores only the trained judge; ``eval_report`` puts
them side by side (zero-shot | BT | GRAM). Judges are read in both slot orders; a scalar reward model in one.
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
    """Scores of one model on the eval set (a judge: both orders; a BT model: one), as a scores-contract table.

    ``model``: a trained model artifact (GRAM judge or BT reward model), or a ModelConfig for the base model
    zero-shot.
    """
    from data_contracts import SCORES
    from gram_core.scorers import is_scalar, score_table
    from tasks.report import ACCURACY, eval_metrics

    log = stage_logger()
    store = ArtifactStore(store_uri)
    if isinstance(model, ModelConfig):
        folder, dtype, name = base_model_dir(model), model.dtype, model.source
    else:
        folder, dtype, name = model_folder(store_uri, model), "float32", model_label(model)
    table = read_table_artifact(store, eval_set)
    scorer = make_judge(folder, judge, dtype)
    scalar = is_scalar(scorer)
    log.info("evaluate %s (%s): scoring %d pairs %s", label, name, table.num_rows,
             "once (scalar reward model)" if scalar else "in both orders")
    scores = score_table(scorer, table, progress=ProgressLog(log, f"evaluate {label}"))
    metrics = eval_metrics(scores, scalar)
    ref = write_table_artifact(store, "evaluate", scores, SCORES,
                              meta={"label": label, "model": name, "eval_set": eval_set.sha256, "metrics": metrics})
    log.info("evaluate %s: accuracy %.3f, position consistency %s -> %s", label, metrics[ACCURACY],
             metrics.get("rewardbench/position_consistency"), ref.uri)
    return ref


REPORT_META_KEYS = ("columns", "eval_set", "eval_rows")  # report meta entries that are not column keys


@task(name="eval_report", cache_policy=STAGE_CACHE_POLICY, persist_result=True)
def eval_report(scores: dict[str, ArtifactRef | None], eval_set: ArtifactRef, store_uri: str,
                eval_name: str = "eval set", names: dict[str, str] | None = None) -> ArtifactRef:
    """report.md + chart.png + metrics.json comparing models side by side.

    ``scores``: column key -> scores artifact (``evaluate``), in column order; None leaves a column out.
    Key "trained" (the GRAM judge, whose metrics the promotion gate reads) is required. ``names``: display
    names by key (default tasks.report.COLUMNS: base "zero-shot", bt "BT", trained "GRAM"). The artifact's
    meta holds ``columns`` ([key, name] pairs, in order) and each column's metrics under its key.
    """
    from tasks.report import COLUMNS, ORDERS, TRAINED, eval_metrics, report_markdown, write_chart

    refs = {key: ref for key, ref in scores.items() if ref is not None}
    labels = {key: (names or {}).get(key) or COLUMNS.get(key, key) for key in refs}
    if TRAINED not in refs or set(refs) & set(REPORT_META_KEYS) or len(set(labels.values())) < len(labels):
        raise ValueError(f"eval_report: columns {labels} need the key {TRAINED!r}, distinct names and none of the "
                         f"keys {REPORT_META_KEYS}")
    store = ArtifactStore(store_uri)
    tables = {key: read_table_artifact(store, ref) for key, ref in refs.items()}
    scalar = {key for key, ref in refs.items() if ref.meta.get("metrics", {}).get(ORDERS) == 1}
    metrics = {key: eval_metrics(tables[key], key in scalar) for key in refs}
    columns = [[key, labels[key]] for key in refs]  # a list: the order survives any JSON round trip
    with store.staging("eval_report") as folder:
        (folder / REPORT_FILE).write_text(report_markdown({labels[k]: tables[k] for k in refs},
                                                          scalar={labels[k] for k in scalar}, eval_name=eval_name))
        write_chart(folder / CHART_FILE, {labels[k]: metrics[k] for k in refs})
        (folder / METRICS_FILE).write_text(json.dumps({"columns": columns, **metrics}, indent=1, sort_keys=True))
        ref = store.publish("eval_report", folder, "report",
                            meta={"columns": columns, **metrics, "eval_set": eval_set.sha256,
                                  "eval_rows": eval_set.rows})
    stage_logger().info("eval_report -> %s", ref.file(REPORT_FILE))
    return ref
