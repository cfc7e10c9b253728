"""The stage table (gram_core.stages.STAGES) is the one list of stages: adding a stage is one row, its plan
function and its config class, and every other list (TRAINING_STAGES, PIPELINE_STAGES, LIVE_STAGES, the train
configs of tasks.settings.stage_settings) follows from the table alone."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gram_core import stages
from gram_core.config import EncodeConfig, TrainConfig, field
from gram_core.models import build_tiny_model
from gram_core.plans import plan_judge
from tasks.settings import PipelineConfig, stage_settings

ROOT = Path(__file__).resolve().parents[1]


# The toy stage: its config class (a section of the pipeline config) ...
@dataclasses.dataclass(frozen=True)
class ToyConfig(TrainConfig):
    steps: int = field(2, "Optimizer steps of the toy stage.")

    def stage_train_config(self, sections):
        return dataclasses.replace(sections.finetune, max_steps=self.steps, batch_size=4, learning_rate=1e-2,
                                   warmup_ratio=0.0)


@dataclasses.dataclass(frozen=True)
class ToyPipelineConfig(PipelineConfig):
    toy: ToyConfig = field(ToyConfig(), "The toy stage.")


# ... and its plan function: stage 2's plan on the rows with their two answers swapped.
def plan_toy(model, tokenizer, rows, train_cfg, encode_cfg):
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    return plan_judge(model, tokenizer, swapped, train_cfg, encode_cfg)


def toy_rows(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    letters = list("abcdefgh")
    return [{"pair_id": str(i), "prompt": " ".join(rng.choice(letters, 4)), "chosen": "better better",
             "rejected": " ".join(rng.choice(letters, 3))} for i in range(n)]


def test_the_derived_lists_are_read_off_the_table():
    names = [s.name for s in stages.STAGES]
    assert stages.PIPELINE_STAGES == tuple(names)
    assert list(stages.TRAINING_STAGES) == ["pretrain", "finetune", "bradley_terry"]
    assert stages.LIVE_STAGES == ("pretrain", "finetune", "register")
    assert all(getattr(PipelineConfig(), s.section) is not None for s in stages.STAGES)  # every section exists
    from flows.pipeline import STEPS

    assert set(STEPS) == set(names)  # the flow says what feeds each stage of the table, nothing more


def test_a_toy_stage_is_one_row_its_plan_function_and_its_config_class(monkeypatch, tiny_tokenizer):
    row = stages.Stage("toy", "toy", plan_toy, stages.save_judge, live=True)
    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES, row))  # the one change: a row in the table

    assert stages.PIPELINE_STAGES[-1] == "toy" and stages.TRAINING_STAGES["toy"] is row
    assert "toy" in stages.LIVE_STAGES  # tasks/store/run_record.py leaves its child run to its task
    assert stages.training_stage("toy") is row  # what the Ray worker looks up by WorkerJob.stage
    config = ToyPipelineConfig()
    settings = stage_settings(config, "toy")  # tasks/settings.py reads the row's section
    assert settings.stage == "toy" and settings.train.max_steps == 2 and settings.train.learning_rate == 1e-2
    assert settings.train.label_smoothing == config.finetune.label_smoothing

    model = build_tiny_model(tiny_tokenizer, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    encode = EncodeConfig(max_length=512)
    trained, result = stages.training_stage("toy").train(model, tiny_tokenizer, toy_rows(8), settings.train, encode)
    assert result.steps == 2 and all(np.isfinite(m["train/loss"]) for m in result.history)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trained.named_parameters())

    # No other module names the stages: the consumers read the table, so the row above was all it took.
    for path in ("tasks/settings.py", "tasks/on_ray/worker.py", "tasks/on_ray/train.py", "tasks/train_stage.py"):
        text = (ROOT / path).read_text()
        assert not re.search(r"\"(pretrain|finetune|bradley_terry|register)\"\s*[,:)]", text), path


def test_an_unknown_stage_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown training stage 'judge'.*'pretrain', 'finetune', 'bradley_terry'"):
        stages.training_stage("judge")
    with pytest.raises(ValueError, match="does not train"):
        stages.Stage("evaluate", "eval").train(None, None, [], TrainConfig(), EncodeConfig())
