"""The GRAM pipeline flow: composition only (which task feeds which).

    sources ─┬─ prompts/pools/pair sets ─ build_pairs ─ pretrain ─┐
             ├─ preferences ──────────────────────────────────── finetune ─ evaluate ────────┐
             │            └──────────── bradley_terry (baseline.enabled) ─ evaluate (bt) ────┤
             └─ eval set ─────────────────── evaluate (base, zero-shot) ─────────────────── eval_report ─ register

One run at a time per state folder (``hold_state_folder``; a second fails at once), and the tracking
server is checked before anything runs. Every data source is loaded and validated first, so bad input fails
before any training. Each task is
cached (inputs' content hashes + config + code version): re-running with nothing changed is all Cached.
The stages run in the order of the stage table (``gram_core.stages.STAGES``); ``STEPS`` says what feeds each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from prefect import flow

from flows.parameters import ConfigOverrides, Preset, overrides_dict
from tasks.baseline import bradley_terry
from tasks.evaluate import eval_report, evaluate
from tasks.finetune import finetune
from tasks.on_mlflow.tracking import start_pipeline_run
from tasks.pretrain import pretrain
from tasks.redaction import process_redacted, redact
from tasks.register import register, version_tags
from tasks.settings import (
    DEFAULT_PRESET,
    PipelineConfig,
    StageSettings,
    load_preset,
    stage_settings,
    state_paths,
)
from tasks.sources import load_source
from tasks.stage1_pairs import build_stage1_pairs
from tasks.store.caching import bind
from tasks.store.run_record import StageRecord, pipeline_params, record_params, record_run, summarize
from tasks.store.state import hold_state_folder


class Runner:
    """Calls tasks bound to one state folder and records each stage's output, Prefect state and settings."""

    def __init__(self, config: PipelineConfig, refresh: bool = False):
        self.config = config
        self.paths = state_paths(config)
        self.refresh = refresh
        self.records: list[StageRecord] = []

    def __call__(self, name: str, task: Any, *args: Any, **kwargs: Any) -> Any:
        bound = bind(task, self.paths.prefect_results, self.refresh).with_options(task_run_name=name)
        state = bound(*args, return_state=True, **kwargs)
        value = state.result()  # raises the task's error: the flow fails here
        ref = value if hasattr(value, "sha256") else None
        self.records.append(StageRecord(name, ref, state.name, record_params(task, args, kwargs)))
        return value

    def settings(self, stage: str) -> StageSettings:
        """The frozen settings of training stage ``stage``."""
        return stage_settings(self.config, stage)

    def source(self, role: str, source: Any, contract: str, **kwargs: Any) -> Any:
        if source is None:
            return None
        return self(f"load_{role}", load_source, role, source, contract, self.paths, **kwargs)


def load_inputs(run: Runner) -> dict[str, Any]:
    """Every source of the run, validated and published (stage-1 sources only when stage 1 runs)."""
    data, cfg = run.config.data, run.config
    stage1 = cfg.pretrain.enabled
    return {
        "prompts": run.source("prompts", data.prompts, "prompts") if stage1 else None,
        "pools": [run.source(f"pool{i}", s, "response_pool") for i, s in enumerate(data.response_pools)]
        if stage1 else [],
        "pair_sets": [run.source(f"pairs{i}", s, "unlabeled_pairs") for i, s in enumerate(data.unlabeled_pairs)]
        if stage1 else [],
        "preferences": run.source("preferences", data.preferences, "preference_pairs"),
        "eval": run.source("eval", data.eval, "rewardbench", limit=cfg.eval.limit, seed=cfg.eval.seed,
                           stratify="subset", whole=tuple(cfg.eval.full_subsets)),
    }


def _build_pairs(run: Runner, out: dict[str, Any], tracking: Any) -> None:
    cfg = run.config
    if cfg.pretrain.enabled:
        out["pairs"] = run("build_pairs", build_stage1_pairs, out["prompts"], out["pools"], out["pair_sets"],
                           cfg.sampling, cfg.pairing, run.paths)


def _pretrain(run: Runner, out: dict[str, Any], tracking: Any) -> None:
    if run.config.pretrain.enabled:
        out["pretrain"] = run("pretrain", pretrain, out["pairs"], run.settings("pretrain"), tracking=tracking)


def _finetune(run: Runner, out: dict[str, Any], tracking: Any) -> None:
    out["model"] = run("finetune", finetune, out["preferences"], out.get("pretrain"), run.settings("finetune"),
                       tracking=tracking)


def _bradley_terry(run: Runner, out: dict[str, Any], tracking: Any) -> None:
    """The Bradley-Terry baseline (from the base model, on stage 2's pairs and steps) when enabled."""
    if run.config.baseline.enabled:
        out["bt_model"] = run("bradley_terry", bradley_terry, out["preferences"], run.settings("bradley_terry"))


def _evaluate(run: Runner, out: dict[str, Any], tracking: Any) -> None:
    cfg, eval_set = run.config, out["eval"]
    fan_out = (cfg.eval.actors, cfg.ray if cfg.eval.actors else None)  # Ray settings matter only when fanning out
    out["scores"] = run("evaluate", evaluate, out["model"], eval_set, cfg.judge, "trained", run.paths, *fan_out)
    out["base_scores"] = run("evaluate_base", evaluate, cfg.model, eval_set, cfg.judge, "base", run.paths,
                             *fan_out) if cfg.eval.compare_base_zero_shot else None
    out["bt_scores"] = run("evaluate_bt", evaluate, out["bt_model"], eval_set, cfg.judge, "bt",
                           run.paths) if cfg.baseline.enabled else None
    columns = {"base": out["base_scores"], "bt": out["bt_scores"], "trained": out["scores"]}
    out["report"] = run("eval_report", eval_report, columns, eval_set, run.paths,
                        redact(cfg.data.eval.describe()))


def _register(run: Runner, out: dict[str, Any], tracking: Any) -> None:
    cfg = run.config
    out["registration"] = run("register", register, out["model"], out["report"], out["eval"], cfg.mlflow, cfg.judge,
                              version_tags(cfg, run.records), run.paths, tracking=tracking)


# What feeds each stage of the stage table (gram_core.stages.STAGES), by name; the table gives the order.
STEPS: dict[str, Callable[[Runner, dict[str, Any], Any], None]] = {
    "build_pairs": _build_pairs, "pretrain": _pretrain, "finetune": _finetune, "bradley_terry": _bradley_terry,
    "evaluate": _evaluate, "register": _register,
}


def run_stages(run: Runner, tracking: Any = None) -> dict[str, Any]:
    """Every stage, in the stage table's order (``PIPELINE_STAGES``); returns every output produced."""
    from gram_core import stages

    order = stages.PIPELINE_STAGES
    missing = [name for name in order if name not in STEPS]
    if missing:
        raise ValueError(f"stage(s) {missing} of gram_core.stages.STAGES have no step in flows/pipeline.py STEPS "
                         "(what feeds them)")
    out = load_inputs(run)
    for name in order:
        STEPS[name](run, out, tracking)
    return out


def pipeline_config(preset: str, overrides: Any, drop_invalid_rows: bool = False) -> PipelineConfig:
    """The preset with the overrides; ``drop_invalid_rows``: on for every data source (``--drop-invalid-rows``)."""
    config = load_preset(preset, overrides_dict(overrides))
    if drop_invalid_rows:
        config = dataclasses.replace(config, data=config.data.dropping_invalid_rows())
    return config.resolved()


def _tracked(config: PipelineConfig, refresh: bool, run_name: str) -> dict[str, Any]:
    """Run the DAG inside one MLflow parent run; record stages and summarise."""
    run = Runner(config, refresh)
    with hold_state_folder(config), \
            start_pipeline_run(config.mlflow, run.paths.home, run_name, params=pipeline_params(config),
                               tags={"gram.preset": config.preset}) as tracking:
        out = run_stages(run, tracking)
        registration = out.get("registration")
        record_run(run.records, out["report"], registration, run.paths, tracking)
        return summarize(out["report"], registration, run.records, run.paths, tracking)


@flow(name="gram-pipeline")
def gram_pipeline(preset: Preset = DEFAULT_PRESET, overrides: ConfigOverrides | None = None,
                  refresh: bool = False, drop_invalid_rows: bool = False) -> dict[str, Any]:
    """The full GRAM pipeline: build pairs, pre-train, fine-tune (and the BT baseline when enabled), evaluate,
    register (+ champion gate). ``drop_invalid_rows``: every data source drops (and logs) the rows that break a
    row-level rule of its contract instead of stopping the run."""
    with process_redacted():  # a deployment run too: no `gram` process set this up
        return _tracked(pipeline_config(preset, overrides, drop_invalid_rows), refresh, f"gram-{preset}")
