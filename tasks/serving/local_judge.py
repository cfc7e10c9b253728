"""The judge in this process, for an RL loop without a `gram serve` server (verl's ``compute_score`` with
GRAM_REWARD_MODEL set): loaded once per process, scored with the shared-prefix engine. Imports torch, so
tasks/serving/reward_client.py imports it only on that path."""

from __future__ import annotations

import functools
from typing import Any

from gram_core.config import JudgeConfig
from gram_core.models import resolve_model_source
from gram_core.reward_scoring import rewards_vs_reference
from gram_core.scorers import open_scorer


@functools.lru_cache(maxsize=1)
def local_judge(model: str) -> Any:
    """The judge ``model`` (a judge folder, .gguf, smollm2 or tiny) opened once in this process."""
    return open_scorer(resolve_model_source(model), JudgeConfig())


def local_rewards_vs_reference(model: str, prompts: list[str], solutions: list[str],
                               references: list[str]) -> list[float]:
    """P(solution ≻ reference) from the judge ``model`` loaded in this process (once), for verl without a server."""
    return [float(v) for v in rewards_vs_reference(local_judge(model), prompts, solutions, references, share=True)]
