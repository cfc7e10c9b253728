"""The training stages as one table: name -> how its examples, step function and collator are built
(a ``Plan``), and how the trained model is saved.

Adding a stage means adding one row here (and its task); the Ray worker and the in-process tests look the
stage up by name instead of branching on it.
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
from gram_core.training import Plan, TrainResult, plan_judge, plan_pretrain, run_plan

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
class TrainingStage:
    """One training stage: ``plan`` builds what ``train`` runs, ``save`` writes the trained model folder."""

    name: str
    plan: PlanFn
    save: SaveFn

    def train(self, model: torch.nn.Module, tokenizer: Any, rows: Iterable[dict], train_cfg: TrainConfig,
              encode_cfg: EncodeConfig, **kwargs: Any) -> tuple[torch.nn.Module, TrainResult]:
        """Train in place; returns the trained module (the reward model wraps ``model``) and the result."""
        plan = self.plan(model, tokenizer, rows, train_cfg, encode_cfg)
        return plan.model, run_plan(plan, train_cfg, **kwargs)


TRAINING_STAGES: dict[str, TrainingStage] = {stage.name: stage for stage in (
    TrainingStage("pretrain", plan_pretrain, save_language_model),
    TrainingStage("finetune", plan_judge, save_judge),
    TrainingStage("bradley_terry", plan_bradley_terry, save_reward_model),
)}


def training_stage(name: str) -> TrainingStage:
    """The stage called ``name``; an unknown name lists the known ones."""
    if name not in TRAINING_STAGES:
        raise ValueError(f"unknown training stage {name!r}; expected one of {list(TRAINING_STAGES)}")
    return TRAINING_STAGES[name]
