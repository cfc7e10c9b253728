"""The pipeline's stages as one table (``STAGES``): each stage's name, config section, and for a training stage
how its examples, step function and collator are built (a ``Plan``) and how the trained model is saved, and
whether its task logs its own MLflow child run.

Every other list of stages is read off this table: ``TRAINING_STAGES`` (here; the Ray worker and the in-process
tests look a stage up by name instead of branching on it), ``PIPELINE_STAGES`` (the flow's order),
``LIVE_STAGES`` (tasks/store/run_record.py) and the train configs of ``tasks.settings.stage_settings``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from gram_core.baseline import BTScorer, plan_bradley_terry
from gram_core.config import EncodeConfig, TrainConfig
from gram_core.judge_settings import judge_settings, write_judge_settings
from gram_core.models import save_model
from gram_core.plans import Plan, plan_judge, plan_pretrain, run_plan
from gram_core.training import TrainResult

PlanFn = Callable[[torch.nn.Module, Any, Iterable[dict], TrainConfig, EncodeConfig], Plan]
# save(trained module, tokenizer, encode config, folder, state_dict): writes the stage's model folder.
SaveFn = Callable[[torch.nn.Module, Any, EncodeConfig, Path, dict | None], None]


def save_language_model(model: torch.nn.Module, tokenizer: Any, encode: EncodeConfig, folder: Path,
                        state_dict: dict | None = None) -> None:
    """A plain HF folder (LoRA merged): the stage-1 model."""
    save_model(model, tokenizer, folder, state_dict=state_dict)


def save_judge(model: torch.nn.Module, tokenizer: Any, encode: EncodeConfig, folder: Path,
               state_dict: dict | None = None) -> None:
    """An HF folder plus the settings the judge must be read out with (gram_core.judge_settings)."""
    save_model(model, tokenizer, folder, state_dict=state_dict)
    write_judge_settings(folder, judge_settings(encode, tokenizer))


def save_reward_model(model: torch.nn.Module, tokenizer: Any, encode: EncodeConfig, folder: Path,
                      state_dict: dict | None = None) -> None:
    """The Bradley-Terry reward model: the HF folder plus its scalar head."""
    scorer = BTScorer(model, tokenizer, encode.max_length, system_prompt=encode.system_prompt)
    scorer.save(folder, state_dict=state_dict)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of the stage table. Every stage has a ``name`` and the ``section`` of the pipeline's config that
    holds its settings; a training stage also has a ``plan`` (builds what ``train`` runs) and a ``save`` (writes
    the trained model folder), and its section's class says which ``TrainConfig`` it trains with
    (``stage_train_config``); ``live``: its task opens its own MLflow child run when it computes (a cached run
    is recorded afterwards from its artifact)."""

    name: str
    section: str
    plan: PlanFn | None = None
    save: SaveFn | None = None
    live: bool = False

    @property
    def trains(self) -> bool:
        return self.plan is not None

    def train(self, model: torch.nn.Module, tokenizer: Any, rows: Iterable[dict], train_cfg: TrainConfig,
              encode_cfg: EncodeConfig, **kwargs: Any) -> tuple[torch.nn.Module, TrainResult]:
        """Train in place; returns the trained module (the reward model wraps ``model``) and the result."""
        if self.plan is None:
            raise ValueError(f"stage {self.name!r} does not train")
        plan = self.plan(model, tokenizer, rows, train_cfg, encode_cfg)
        return plan.model, run_plan(plan, train_cfg, **kwargs)


# The pipeline's stages, in the order the pipeline runs them: the one table. Adding a stage is a row here, its
# plan function (a training stage) and its config class (a section of tasks.settings.PipelineConfig); the lists
# below are read off it.
STAGES: tuple[Stage, ...] = (
    Stage("build_pairs", "pairing"),
    Stage("pretrain", "pretrain", plan_pretrain, save_language_model, live=True),
    Stage("finetune", "finetune", plan_judge, save_judge, live=True),
    Stage("bradley_terry", "baseline", plan_bradley_terry, save_reward_model),
    Stage("evaluate", "eval"),
    Stage("register", "mlflow", live=True),
)


def _training_stages() -> dict[str, Stage]:
    return {stage.name: stage for stage in STAGES if stage.trains}


def __getattr__(name: str) -> Any:
    """The lists derived from ``STAGES``, read off it on every access (PEP 562): ``TRAINING_STAGES`` (name ->
    row, the stages that train), ``PIPELINE_STAGES`` (every name, in order) and ``LIVE_STAGES`` (the names
    whose task opens its own child run)."""
    if name == "TRAINING_STAGES":
        return _training_stages()
    if name == "PIPELINE_STAGES":
        return tuple(stage.name for stage in STAGES)
    if name == "LIVE_STAGES":
        return tuple(stage.name for stage in STAGES if stage.live)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def training_stage(name: str) -> Stage:
    """The training stage called ``name``; an unknown name lists the known ones."""
    known = _training_stages()
    if name not in known:
        raise ValueError(f"unknown training stage {name!r}; expected one of {list(known)}")
    return known[name]
