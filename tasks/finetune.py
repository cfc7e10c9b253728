"""Stage 2 task: fine-tune the judge on labeled preference pairs (METHOD.md section 3) under Ray Train."""

from __future__ import annotations

from prefect import task

from gram_core.config import EncodeConfig, ModelConfig, TrainConfig
from tasks.artifacts import ArtifactRef
from tasks.caching import STAGE_CACHE_POLICY
from tasks.retries import HUB_RETRIES
from tasks.settings import RayConfig
from tasks.stages import base_model_dir, train_stage
from tasks.tracking import RunHandle


@task(name="finetune", cache_policy=STAGE_CACHE_POLICY, persist_result=True, **HUB_RETRIES)
def finetune(preferences: ArtifactRef, start: ArtifactRef | None, model: ModelConfig, train: TrainConfig,
             encode: EncodeConfig, ray: RayConfig, store_uri: str, ray_storage: str, tracking: RunHandle | None = None) -> ArtifactRef:
    """The judge (HF folder artifact): label-smoothed A/B loss, from ``start`` (stage 1) or the base model."""
    return train_stage("finetune", data=preferences, start=start if start is not None else base_model_dir(model),
                       model=model, train=train, encode=encode, ray=ray, store_uri=store_uri,
                       ray_storage=ray_storage, tracking=tracking)
