"""The adapt flow: fine-tune a registered judge on a small labeled set for a new task, evaluate, register.

The paper's few-label adaptation: start from ``models:/NAME@champion`` (or any version), fine-tune on a few
hundred labeled pairs, compare with the starting model on the eval set, register the result (gate included).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow

from flows.parameters import ConfigOverrides, Preset, overrides_dict, reveal
from flows.pipeline import Runner
from gram_core.sources import SourceConfig
from tasks.evaluate import eval_report, evaluate
from tasks.finetune import finetune
from tasks.on_mlflow.tracking import start_pipeline_run
from tasks.redaction import process_redacted, redact
from tasks.register import fetch_registered_model, register, version_tags
from tasks.settings import DEFAULT_PRESET, PipelineConfig, load_preset
from tasks.store.run_record import pipeline_params, record_run, summarize
from tasks.store.state import hold_state_folder

DEFAULT_MODEL = "models:/gram-reward-model@champion"


def adapt_config(preset: str, overrides: Any, data: str | None, drop_invalid_rows: bool = False) -> PipelineConfig:
    """The preset with ``data`` (a labeled file or folder) as the fine-tuning set; ``drop_invalid_rows``: the
    fine-tuning set and the eval set drop (and log) the rows that break a row-level rule."""
    cfg = load_preset(preset, overrides_dict(overrides))
    if data:
        prefs = cfg.data.preferences
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, preferences=SourceConfig(
            path=data, drop_invalid_rows=prefs.drop_invalid_rows, max_dropped_share=prefs.max_dropped_share)))
    if drop_invalid_rows:
        cfg = dataclasses.replace(cfg, data=cfg.data.dropping_invalid_rows(("preferences", "eval")))
    return cfg.resolved()


@flow(name="gram-adapt")
def adapt(model: str = DEFAULT_MODEL, data: str | None = None, preset: Preset = DEFAULT_PRESET,
          overrides: ConfigOverrides | None = None, refresh: bool = False,
          drop_invalid_rows: bool = False) -> dict[str, Any]:
    """Fine-tune the registered judge ``model`` on ``data`` (preference pairs), evaluate, register.
    ``drop_invalid_rows``: ``data`` and the eval set drop (and log) the rows that break a row-level rule."""
    with process_redacted():  # a deployment run too: no `gram` process set this up
        return _adapt(reveal(model), adapt_config(preset, overrides, reveal(data), drop_invalid_rows), refresh)


def _adapt(model: str, cfg: PipelineConfig, refresh: bool) -> dict[str, Any]:
    run = Runner(cfg, refresh)
    state = run.paths
    with hold_state_folder(cfg), \
            start_pipeline_run(cfg.mlflow, state.home, "gram-adapt", params={**pipeline_params(cfg),
                                                                            "adapt_from": redact(model)},
                               tags={"gram.preset": cfg.preset, "gram.flow": "adapt"}) as tracking:
        preferences = run.source("preferences", cfg.data.preferences, "preference_pairs")
        eval_set = run.source("eval", cfg.data.eval, "rewardbench", limit=cfg.eval.limit, seed=cfg.eval.seed,
                              stratify="subset", whole=tuple(cfg.eval.full_subsets))
        start = run("fetch_registered_model", fetch_registered_model, model, cfg.mlflow, state)
        judge = run("finetune", finetune, preferences, start, run.settings("finetune"), tracking=tracking)
        trained = run("evaluate", evaluate, judge, eval_set, cfg.judge, "adapted", state)
        before = run("evaluate_base", evaluate, start, eval_set, cfg.judge, "before", state)
        report = run("eval_report", eval_report, {"base": before, "trained": trained}, eval_set, state,
                     redact(cfg.data.eval.describe()), names={"base": f"{redact(model)} (before)",
                                                              "trained": "adapted judge"})
        tags = {**version_tags(cfg, run.records), "adapted_from": start.meta.get("model_uri", model)}
        registration = run("register", register, judge, report, eval_set, cfg.mlflow, cfg.judge, tags, state,
                           tracking=tracking)
        record_run(run.records, report, registration, state, tracking)
        return summarize(report, registration, run.records, state, tracking)
