"""One training stage as a task body: run it under Ray Train and publish the trained model folder.

``train_stage(data, start, settings)`` is what the stage tasks (pretrain, finetune, bradley_terry) call:
the data artifact, the start model (an artifact or a base-model source) and the stage's frozen settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from gram_core.config import ModelConfig, config_hash
from tasks.on_mlflow import tracking as mlf
from tasks.progress import ProgressLog
from tasks.settings import StageSettings, StatePaths
from tasks.store.artifacts import TABLE_FILE, ArtifactRef, open_store
from tasks.store.caching import stage_logger


def base_model_dir(model: ModelConfig) -> str:
    """The base model as a local HF folder (or hub id), converting the packaged default once."""
    from gram_core.models import resolve_model_source

    return resolve_model_source(model.source, model.gguf_file, model.seed)


def model_folder(state: StatePaths, start: ArtifactRef | str) -> str:
    """A model artifact's local folder, or a model source passed through unchanged."""
    if isinstance(start, ArtifactRef):
        return str(open_store(state).local_dir(start))
    return start


def model_label(start: ArtifactRef | str) -> str:
    """What a model is, for logs and tags: an artifact hash or the source string."""
    return f"{start.kind}:{start.short}" if isinstance(start, ArtifactRef) else str(start)


def run_name(stage: str, *parts: Any, home: str | Path | None = None) -> str:
    """The resume key: a Ray run name that is the same whenever the stage's inputs are, so an interrupted
    run (stopped, crashed, killed) continues from its last checkpoint when the stage runs again.

    It covers the stage, the training data (content hash), the start model (artifact hash or source) and
    the model, train and encode configs. The code version is left out on purpose, so an unrelated code edit
    keeps the checkpoints; the checkpoint itself records the run layout (examples, global batch, total
    steps) and a mismatch on resume fails with a message. After a code change that alters what training
    computes, delete ``<ray_storage>/<run name>`` (or `gram gc`) to start that stage over.

    With ``home`` the name ends with the state folder's identity (``tasks.store.state.home_id``): two state folders
    sharing a Ray storage folder never share a run, and gc knows whose run a folder is.
    """
    from tasks.store.state import home_id

    text = "|".join(p.sha256 if isinstance(p, ArtifactRef) else config_hash(p) if hasattr(p, "__dataclass_fields__")
                    else str(p) for p in parts)
    name = f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return f"{name}-{home_id(home)}" if home is not None else name


def train_stage(data: ArtifactRef, start: ArtifactRef | str, settings: StageSettings,
                tracking: Any = None) -> ArtifactRef:
    """Run one training stage under Ray Train and publish the trained HF folder as a model artifact.

    Workers read the data and the start model from the artifact store's URIs (shared storage on a cluster).
    With ``tracking`` (the pipeline's parent run) the stage's MLflow child run is opened here, with the
    settings' params, and receives every step's metrics live from rank 0; a Prefect progress artifact
    follows the steps.
    """
    from tasks.on_ray.train import fit

    stage, log = settings.stage, stage_logger()
    store = open_store(settings.store)
    store.require(data)
    name = run_name(stage, data, start, settings.model, settings.train, settings.encode, home=settings.store.home)
    log.info("%s: %d examples from %s, starting from %s (Ray run %s)", stage, data.rows or 0, data.short,
             model_label(start), name)
    began = time.monotonic()
    child = (mlf.stage_run(stage, params=settings.params(), tags={"gram.cached": "false", "gram.live": "true"},
                           parent=tracking) if tracking is not None else contextlib.nullcontext())
    with child as handle, store.staging(stage) as folder:
        result = fit(settings, model_source=start.uri if isinstance(start, ArtifactRef) else start,
                     data_path=data.file(TABLE_FILE), output_dir=str(folder), run_name=name, tracking=handle,
                     on_progress=ProgressLog(log, stage, artifact=True).step)
        final = {k: v for k, v in (result.get("final_metrics") or {}).items() if isinstance(v, (int, float))}
        meta = {"stage": stage, "steps": int(result.get("steps", 0)), "final_metrics": final,
                "data": data.sha256, "start": model_label(start), "run_name": name,
                "resumed_from_step": int(result.get("resumed_from_step", 0))}
        ref = store.publish(stage, folder, "model", meta=meta)
        if handle is not None:
            mlf.set_tags({"gram.artifact": ref.uri, "gram.sha256": ref.sha256, "gram.state": "Completed"},
                         run_id=handle.run_id)
    _drop_checkpoints(settings.store, name)
    log.info("%s: %d steps in %.0f s (resumed from step %d), final %s -> %s", stage, meta["steps"],
             time.monotonic() - began, meta["resumed_from_step"], json.dumps(final), ref.uri)
    return ref


def _drop_checkpoints(state: StatePaths, name: str) -> None:
    """Published: the run's Ray checkpoints were only there to resume it. Only this state folder's own run
    (its name ends with the folder's identity): another folder's live run of the same inputs is its own."""
    from tasks.store.state import home_id, run_owner

    if "://" not in state.ray_storage and run_owner(name) == home_id(state.home):
        shutil.rmtree(Path(state.ray_storage) / name, ignore_errors=True)
