"""Stage 2 task: fine-tune the judge on labeled preference pairs (METHOD.md section 3) under Ray Train."""

from __future__ import annotations

from prefect import task

from tasks.on_mlflow.tracking import RunHandle
from tasks.redaction import scrub_errors
from tasks.retries import HUB_RETRIES
from tasks.settings import StageSettings
from tasks.store.artifacts import ArtifactRef
from tasks.store.caching import STAGE_CACHE_POLICY
from tasks.train_stage import base_model_dir, train_stage


@task(name="finetune", cache_policy=STAGE_CACHE_POLICY, persist_result=True, **HUB_RETRIES)
@scrub_errors
def finetune(preferences: ArtifactRef, start: ArtifactRef | None, settings: StageSettings,
             tracking: RunHandle | None = None) -> ArtifactRef:
    """The judge (HF folder artifact): label-smoothed A/B loss, from ``start`` (stage 1) or the base model."""
    return train_stage(preferences, start if start is not None else base_model_dir(settings.model), settings,
                       tracking)
