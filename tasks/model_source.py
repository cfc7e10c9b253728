"""MODEL specs -> a local folder, and the scorer of one: what the CLI (`gram judge/rank/eval/serve`) opens.

A spec is a registry URI (models:/NAME@ALIAS or models:/NAME/VERSION, downloaded once per version into
<home>/registered), a local Hugging Face folder (a GRAM judge, a base LM, a Bradley-Terry reward model), a .gguf
file, 'smollm2' or 'tiny' (``gram_core.models.resolve_model_source``). Whatever the spec, the scorer comes from
``gram_core.scorers.open_scorer``. MLflow is imported only for a registry URI.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def resolve_model(spec: str, config: Any) -> str:
    """A local model folder for any MODEL spec; ``config`` is the resolved PipelineConfig (home, mlflow)."""
    if spec.startswith("models:/"):
        from tasks.on_mlflow.model_registry import registered_model_dir
        from tasks.on_mlflow.tracking import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(config.mlflow, config.home)
        folder, resolved = registered_model_dir(spec, tracking_uri, Path(str(config.home)) / "registered")
        print(f"{spec} -> {resolved}", file=sys.stderr)
        return str(folder)
    from gram_core.models import resolve_model_source
    from gram_core.scorers import folder_kind

    if Path(spec).expanduser().is_dir():
        folder_kind(spec)  # a folder of no known kind fails here, naming the kinds it could be
    return resolve_model_source(spec)


def open_model(spec: str, config: Any):
    """``open_scorer`` of ``resolve_model(spec)`` with ``config.judge``: a Judge or a BTScorer."""
    from gram_core.scorers import open_scorer

    return open_scorer(resolve_model(spec, config), config.judge)
