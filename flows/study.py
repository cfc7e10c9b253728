"""The quality study flow: the paper's comparison at small scale, composed from the pipeline's own tasks.

    sources ─ build_pairs ─ pretrain ─┬─ finetune (ε) ──── evaluate (gram) ───────┐
                                      └─ finetune (ε = 0) ─ evaluate (gram_eps0) ──┤
              preferences ─┬─ finetune from the base model ─ evaluate (judge_no_stage1)
                           └─ bradley_terry ──────────────── evaluate (bt) ───────┤
              eval set ─────────────────────────── evaluate (zero_shot) ───────── study_report

Every arm starts from the same base model, sees the same labelled pairs and takes the same number of
stage-2 optimizer steps, except the judge without stage 1, which also gets stage 1's steps
(``study.match_total_steps``) so the ablation compares equal compute in steps; ``study.arms`` picks the arms; each arm's scores are a cached task, so a rerun with one arm changed re-runs only
that arm. Each arm is an MLflow child run of the study run (its training curve and its eval metrics).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow

from flows.pipeline import Runner, load_inputs, pipeline_config
from gram_core.artifact_files import STUDY_CHART, STUDY_FILE
from gram_core.config import check
from tasks.baseline import bradley_terry
from tasks.evaluate import evaluate
from tasks.finetune import finetune
from tasks.on_mlflow.tracking import start_pipeline_run
from tasks.pretrain import pretrain
from tasks.quality_study import record_study, study_report
from tasks.redaction import process_redacted, redact, redact_value
from tasks.settings import StageSettings
from tasks.stage1_pairs import build_stage1_pairs
from tasks.store.run_record import dropped_rows, pipeline_params
from tasks.store.state import hold_state_folder

DEFAULT_STUDY_PRESET = "study"


def run_study(run: Runner) -> dict[str, Any]:
    cfg, state = run.config, run.paths
    arms = cfg.study.arms
    judge = run.settings("finetune")
    no_stage1 = no_stage1_settings(cfg, judge)  # checked before any data is read
    inputs = load_inputs(run)
    prefs, eval_set = inputs["preferences"], inputs["eval"]
    pairs = run("build_pairs", build_stage1_pairs, inputs["prompts"], inputs["pools"], inputs["pair_sets"],
                cfg.sampling, cfg.pairing, state)
    stage1 = run("pretrain", pretrain, pairs, run.settings("pretrain"))
    models = {"gram": run("finetune_gram", finetune, prefs, stage1, judge)}  # first: the arm all others face
    if "bt" in arms:
        models["bt"] = run("bradley_terry", bradley_terry, prefs, run.settings("bradley_terry"))
    if "judge_no_stage1" in arms:
        models["judge_no_stage1"] = run("finetune_no_stage1", finetune, prefs, None, no_stage1)
    if "gram_eps0" in arms:
        eps0 = dataclasses.replace(judge, train=dataclasses.replace(judge.train, label_smoothing=0.0))
        models["gram_eps0"] = run("finetune_gram_eps0", finetune, prefs, stage1, eps0)
    scores = {}
    if "zero_shot" in arms:
        scores["zero_shot"] = run("evaluate_zero_shot", evaluate, cfg.model, eval_set, cfg.judge, "zero_shot", state)
    for arm, model in models.items():
        scores[arm] = run(f"evaluate_{arm}", evaluate, model, eval_set, cfg.judge, arm, state)
    report = run("study_report", study_report, scores, eval_set, state, redact(cfg.data.eval.describe()),
                 {"stage1": stage1, **models})
    return {"models": models, "scores": scores, "report": report}


def no_stage1_settings(cfg: Any, judge: StageSettings) -> StageSettings:
    """Stage 2 from the base model; with ``study.match_total_steps`` it also gets stage 1's optimizer steps."""
    if not cfg.study.match_total_steps:
        return judge
    check(judge.train.max_steps > 0 and cfg.pretrain.max_steps > 0, "study.match_total_steps",
          "needs finetune.max_steps and pretrain.max_steps set (> 0); or set study.match_total_steps=false")
    steps = judge.train.max_steps + cfg.pretrain.max_steps
    return dataclasses.replace(judge, train=dataclasses.replace(judge.train, max_steps=steps))


@flow(name="gram-study")
def gram_study(preset: str = DEFAULT_STUDY_PRESET, overrides: dict[str, Any] | list[str] | None = None,
               refresh: bool = False, drop_invalid_rows: bool = False) -> dict[str, Any]:
    """Zero-shot | BT | judge without stage 1 | GRAM (ε) | GRAM (ε = 0) on one eval set, one MLflow run per arm.
    ``drop_invalid_rows``: every data source drops (and logs) the rows that break a row-level rule."""
    with process_redacted():  # a deployment run too: no `gram` process set this up
        return _study(preset, pipeline_config(preset, overrides, drop_invalid_rows), refresh)


def _study(preset: str, config: Any, refresh: bool) -> dict[str, Any]:
    run = Runner(config, refresh)
    with hold_state_folder(config), \
            start_pipeline_run(config.mlflow, run.paths.home, f"gram-study-{preset}", params=pipeline_params(config),
                               tags={"gram.preset": config.preset, "gram.flow": "study"}) as tracking:
        out = run_study(run)
        dropped = dropped_rows(run.records)
        record_study(out["report"], out["models"], out["scores"], run.paths, tracking, dropped)
    report = out["report"]
    return redact_value({  # printed by `gram study` and kept by Prefect as the flow's result
        "report": report.file(STUDY_FILE), "chart": report.file(STUDY_CHART), "arms": report.meta["arms"],
        "eval_rows": report.meta.get("eval_rows"), "dropped_rows": dropped, "mlflow_run": tracking.url or tracking.run_id,
        "tracking_uri": tracking.tracking_uri, "stages": {r.name: r.state for r in run.records},
        "artifact_store": run.paths.artifact_store})
