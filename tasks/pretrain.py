"""Stage 1 task: pre-train the base model on unlabeled pairs (METHOD.md section 2) under Ray Train."""

from __future__ import annotations

from prefect import task

from tasks.on_mlflow.tracking import RunHandle
from tasks.redaction import scrub_errors
from tasks.retries import HUB_RETRIES
from tasks.settings import StageSettings
from tasks.store.artifacts import ArtifactRef
from tasks.store.caching import STAGE_CACHE_POLICY
from tasks.train_stage import base_model_dir, train_stage


@task(name="pretrain", cache_policy=STAGE_CACHE_POLICY, persist_result=True, **HUB_RETRIES)
@scrub_errors
def pretrain(pairs: ArtifactRef, settings: StageSettings, tracking: RunHandle | None = None) -> ArtifactRef:
    """The stage-1 model (HF folder artifact), trained with the LM loss on both responses of each pair."""
    return train_stage(pairs, base_model_dir(settings.model), settings, tracking)
