"""Baseline task: the Bradley-Terry reward model (gram_core/baseline.py) under Ray Train, from the base model."""

from __future__ import annotations

import dataclasses

from prefect import task

from tasks.redaction import scrub_errors
from tasks.settings import StageSettings
from tasks.store.artifacts import ArtifactRef
from tasks.store.caching import STAGE_CACHE_POLICY, stage_logger
from tasks.train_stage import base_model_dir, train_stage


@task(name="bradley_terry", cache_policy=STAGE_CACHE_POLICY, persist_result=True)
@scrub_errors
def bradley_terry(preferences: ArtifactRef, settings: StageSettings) -> ArtifactRef:
    """The BT reward model (HF folder + reward head artifact) on stage 2's pairs, from the base model, with
    stage 2's optimizer steps and sequences per micro-batch (``bt_train_config``; ``settings.train`` is
    stage 2's TrainConfig, its learning rate already the baseline's)."""
    from gram_core.baseline import bt_train_config

    if not preferences.rows:
        raise ValueError(f"bradley_terry: the preference artifact {preferences.uri} records no row count")
    train = bt_train_config(settings.train, settings.encode, preferences.rows, settings.runtime.num_workers)
    stage_logger().info("bradley_terry: %d optimizer steps (baseline.max_steps, or stage 2's when 0), %d pairs x %d "
                        "micro-batches per step, lr %g", train.max_steps, train.batch_size, train.grad_accum_steps,
                        train.learning_rate)
    return train_stage(preferences, base_model_dir(settings.model), dataclasses.replace(settings, train=train))
