"""Stage 1 task: pre-train the base model on unlabeled pairs (METHOD.md section 2) under Ray Train."""

from __future__ import annotations

from prefect import task

from gram_core.config import EncodeConfig, ModelConfig, TrainConfig
from tasks.artifacts import ArtifactRef
from tasks.caching import STAGE_CACHE_POLICY
from tasks.retries import HUB_RETRIES
from tasks.settings import RayConfig
from tasks.stages import base_model_dir, train_stage
from tasks.tracking import RunHandle


@task(name="pretrain", cache_policy=STAGE_CACHE_POLICY, persist_result=True, **HUB_RETRIES)
def pretrain(pairs: ArtifactRef, model: ModelConfig, train: TrainConfig, encode: EncodeConfig, ray: RayConfig,
             store_uri: str, ray_storage: str, tracking: RunHandle | None = None) -> ArtifactRef:
    """The stage-1 model (HF folder artifact), trained with the LM loss on both responses of each pair."""
    return train_stage("pretrain", data=pairs, start=base_model_dir(model), model=model, train=train,
                       encode=encode, ray=ray, store_uri=store_uri, ray_storage=ray_storage, tracking=tracking)
