"""Evaluation tasks: score a model on the eval set, then write the comparison report.

``evaluate`` runs once per model (the trained judge; the base model zero-shot and the Bradley-Terry baseline
when configured), so a changed fine-tuning config re-scores only the trained judge; ``eval_report`` puts
them side by side (zero-shot | BT | GRAM). Judges are read in both slot orders; a scalar reward model in one.
"""

from __future__ import annotations

import json

from prefect import task

from gram_core.artifact_files import CHART_FILE, EVAL_METRICS_FILE, REPORT_FILE
from gram_core.config import JudgeConfig, ModelConfig
from tasks.progress import ProgressLog
from tasks.redaction import scrub_errors
from tasks.retries import HUB_RETRIES
from tasks.settings import RayConfig, StatePaths
from tasks.store.artifacts import ArtifactRef, open_store, read_table_artifact, write_table_artifact
from tasks.store.caching import STAGE_CACHE_POLICY, stage_logger
from tasks.train_stage import base_model_dir, model_folder, model_label


def score_model(folder: str, table, judge: JudgeConfig, actors: int = 0, ray: RayConfig | None = None,
                progress=None, state: StatePaths | None = None):
    """(scores-contract table, scalar?) of ``table`` by the model in ``folder`` (``gram_core.scorers.open_scorer``:
    a GRAM judge or a base model, both orders; a Bradley-Terry reward model, one order), scored by
    ``gram_core.scorers.score_table`` in this process, or fanned out over ``actors`` Ray Data actors with the
    same scores in the same row order. A local Ray runtime started for the actors is recorded in ``state``'s
    folder (the one this process holds)."""
    from gram_core.scorers import is_scalar, open_scorer, score_table

    if actors:
        from tasks.on_ray.judge import score_pairs_distributed

        return score_pairs_distributed(folder, table, judge, actors, ray or RayConfig(), state)
    scorer = open_scorer(folder, judge)
    return score_table(scorer, table, progress=progress), is_scalar(scorer)


@task(name="evaluate", cache_policy=STAGE_CACHE_POLICY, persist_result=True, **HUB_RETRIES)
@scrub_errors
def evaluate(model: ArtifactRef | ModelConfig, eval_set: ArtifactRef, judge: JudgeConfig, label: str,
             state: StatePaths, actors: int = 0, ray: RayConfig | None = None) -> ArtifactRef:
    """Scores of one model on the eval set (a judge: both orders; a BT model: one), as a scores-contract table.

    ``model``: a trained model artifact (GRAM judge or BT reward model), or a ModelConfig for the base model
    zero-shot (scored at the same ``judge.dtype`` as the trained one). ``actors`` > 0 fans judge scoring out
    over a Ray cluster (any kind of model).
    """
    from data_contracts import SCORES
    from gram_core.comparison_report import ACCURACY, eval_metrics

    log = stage_logger()
    store = open_store(state)
    if isinstance(model, ModelConfig):
        folder, name = base_model_dir(model), model.source
    else:  # fanning out: the actors read the artifact from the store themselves
        folder = store.require(model).uri if actors else model_folder(state, model)
        name = model_label(model)
    table = read_table_artifact(store, eval_set)
    where = f"over {actors} Ray Data actors" if actors else "in process"
    log.info("evaluate %s (%s): scoring %d pairs, %s", label, name, table.num_rows, where)
    scores, scalar = score_model(folder, table, judge, actors, ray, progress=ProgressLog(log, f"evaluate {label}"),
                                 state=state)
    metrics = eval_metrics(scores, scalar)
    ref = write_table_artifact(store, "evaluate", scores, SCORES,
                              meta={"label": label, "model": name, "eval_set": eval_set.sha256, "metrics": metrics})
    log.info("evaluate %s: accuracy %.3f, position consistency %s -> %s", label, metrics[ACCURACY],
             metrics.get("rewardbench/position_consistency"), ref.uri)
    return ref


# Report meta entries that are not column keys.
REPORT_META_KEYS = ("columns", "eval_set", "eval_rows", "evidence", "dropped_rows")


@task(name="eval_report", cache_policy=STAGE_CACHE_POLICY, persist_result=True)
@scrub_errors
def eval_report(scores: dict[str, ArtifactRef | None], eval_set: ArtifactRef, state: StatePaths,
                eval_name: str = "eval set", names: dict[str, str] | None = None) -> ArtifactRef:
    """report.md + chart.png + metrics.json comparing models side by side.

    ``scores``: column key -> scores artifact (``evaluate``), in column order; None leaves a column out.
    Key "trained" (the GRAM judge, whose metrics the promotion gate reads) is required. ``names``: display
    names by key (default gram_core.comparison_report.COLUMNS: base "zero-shot", bt "BT", trained "GRAM"). The artifact's
    meta holds ``columns`` ([key, name] pairs, in order) and each column's metrics under its key.
    """
    from gram_core.comparison_report import (
        COLUMNS,
        ORDERS,
        TRAINED,
        comparison_markdown,
        eval_metrics,
        write_chart,
    )
    from gram_core.evidence import evidence
    from gram_core.sources import DROPPED_ROWS

    refs = {key: ref for key, ref in scores.items() if ref is not None}
    labels = {key: (names or {}).get(key) or COLUMNS.get(key, key) for key in refs}
    if TRAINED not in refs or set(refs) & set(REPORT_META_KEYS) or len(set(labels.values())) < len(labels):
        raise ValueError(f"eval_report: columns {labels} need the key {TRAINED!r}, distinct names and none of the "
                         f"keys {REPORT_META_KEYS}")
    store = open_store(state)
    tables = {key: read_table_artifact(store, ref) for key, ref in refs.items()}
    scalar = {key for key, ref in refs.items() if ref.meta.get("metrics", {}).get(ORDERS) == 1}
    metrics = {key: eval_metrics(tables[key], key in scalar) for key in refs}
    columns = [[key, labels[key]] for key in refs]  # a list: the order survives any JSON round trip
    ev = evidence({labels[k]: tables[k] for k in refs}, read_table_artifact(store, eval_set).to_pylist(),
                  scalar=[labels[k] for k in scalar])
    dropped = eval_set.meta.get(DROPPED_ROWS)  # None unless the eval source drops invalid rows
    with store.staging("eval_report") as folder:
        (folder / REPORT_FILE).write_text(comparison_markdown({labels[k]: tables[k] for k in refs},
                                                          scalar={labels[k] for k in scalar}, eval_name=eval_name,
                                                          evidence=ev, dropped=dropped, chart=CHART_FILE))
        write_chart(folder / CHART_FILE, {labels[k]: metrics[k] for k in refs})
        (folder / EVAL_METRICS_FILE).write_text(json.dumps({"columns": columns, **metrics}, indent=1, sort_keys=True))
        ref = store.publish("eval_report", folder, "report",
                            meta={"columns": columns, **metrics, "evidence": ev, "eval_set": eval_set.sha256,
                                  "eval_rows": eval_set.rows, **({DROPPED_ROWS: dropped} if dropped else {})})
    stage_logger().info("eval_report -> %s", ref.file(REPORT_FILE))
    return ref
