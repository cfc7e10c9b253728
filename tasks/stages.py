"""Helpers the stage tasks share: task options, model folders, stable run names, progress lines.

Each stage task lives in its own module (build_pairs, pretrain, finetune, evaluate, register); the flows
bind them to one state folder with ``bind`` (cached results under <home>/prefect-results).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

from gram_core.config import ModelConfig, config_hash
from tasks.artifacts import ArtifactRef, ArtifactStore
from tasks.caching import stage_options

# Inputs that identify where a run is logged, not what it computes: left out of cache keys.
NOT_IN_KEY = ("tracking",)


def bind(task: Any, result_dir: str | Path, refresh: bool = False) -> Any:
    """``task`` with its cached results kept in ``result_dir``; ``refresh`` recomputes and overwrites."""
    policy = task.cache_policy
    for name in NOT_IN_KEY:
        policy = policy - name
    return task.with_options(**stage_options(result_dir, refresh, policy))


def base_model_dir(model: ModelConfig) -> str:
    """The base model as a local HF folder (or hub id), converting the packaged default once."""
    from gram_core.models import resolve_model_source

    return resolve_model_source(model.source, model.gguf_file, model.seed)


def model_folder(store_uri: str, start: ArtifactRef | str) -> str:
    """A model artifact's local folder, or a model source passed through unchanged."""
    if isinstance(start, ArtifactRef):
        return str(ArtifactStore(store_uri).local_dir(start))
    return start


def model_label(start: ArtifactRef | str) -> str:
    """What a model is, for logs and tags: an artifact hash or the source string."""
    return f"{start.kind}:{start.short}" if isinstance(start, ArtifactRef) else str(start)


def run_name(stage: str, *parts: Any) -> str:
    """The resume key: a Ray run name that is the same whenever the stage's inputs are, so an interrupted
    run (stopped, crashed, killed) continues from its last checkpoint when the stage runs again.

    It covers the stage, the training data (content hash), the start model (artifact hash or source) and
    the model, train and encode configs. The code version is left out on purpose, so an unrelated code edit
    keeps the checkpoints; the checkpoint itself records the run layout (examples, global batch, total
    steps) and a mismatch on resume fails with a message. After a code change that alters what training
    computes, delete ``<ray_storage>/<run name>`` (or `gram gc`) to start that stage over.
    """
    text = "|".join(p.sha256 if isinstance(p, ArtifactRef) else config_hash(p) if hasattr(p, "__dataclass_fields__")
                    else str(p) for p in parts)
    return f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


class ProgressLog:
    """progress(done, total) callback that logs about every ``every`` percent with rate and ETA."""

    def __init__(self, log: Any, what: str, every: float = 10.0):
        self.log, self.what, self.every = log, what, every
        self.start = time.monotonic()
        self.next_pct = every

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        if pct + 1e-9 < self.next_pct and done < total:
            return
        while self.next_pct <= pct:
            self.next_pct += self.every
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(done, 1) * (total - done)
        self.log.info("%s: %d/%d (%.0f%%), %.0f s elapsed, ~%.0f s left", self.what, done, total, pct, elapsed, eta)


METRICS_FILE = "metrics.jsonl"


class TrainingProgress:
    """on_progress(step, fraction) for ``fit``: a Prefect progress artifact on the task run (updated while the
    workers train) and a log line about every ``every`` percent."""

    def __init__(self, log: Any, stage: str, every: float = 10.0):
        from prefect.artifacts import create_progress_artifact
        from prefect.context import TaskRunContext

        self.log, self.stage, self.every, self.next_pct = log, stage, every, every
        self.start = time.monotonic()
        self.artifact = None
        if TaskRunContext.get() is not None:  # outside a task run there is nothing to attach it to
            self.artifact = create_progress_artifact(0.0, description=f"{stage}: optimizer steps done (%)")

    def __call__(self, step: int, fraction: float) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.artifact is not None:
            update_progress_artifact(self.artifact, 100.0 * fraction)
        if 100.0 * fraction + 1e-9 >= self.next_pct:
            while self.next_pct <= 100.0 * fraction + 1e-9:
                self.next_pct += self.every
            elapsed = time.monotonic() - self.start
            self.log.info("%s: step %d (%.0f%%), %.0f s elapsed, ~%.0f s left", self.stage, step, 100 * fraction,
                          elapsed, elapsed / max(fraction, 1e-9) * (1 - fraction))


def train_stage(stage: str, *, data: ArtifactRef, start: ArtifactRef | str, model: ModelConfig, train: Any,
                encode: Any, ray: Any, store_uri: str, ray_storage: str, tracking: Any = None) -> ArtifactRef:
    """Run one training stage under Ray Train and publish the trained HF folder as a model artifact.

    Workers read the data and the start model from the artifact store's URIs (shared storage on a cluster).
    With ``tracking`` (the pipeline's parent run) the stage's MLflow child run is opened here and receives
    every step's metrics live from rank 0; a Prefect progress artifact follows the steps.
    """
    import json

    from tasks import tracking as mlf
    from tasks.artifacts import TABLE_FILE
    from tasks.caching import stage_logger
    from tasks.ray_train import fit

    log = stage_logger()
    store = ArtifactStore(store_uri)
    store.require(data)
    name = run_name(stage, data, start, model, train, encode)
    log.info("%s: %d examples from %s, starting from %s (Ray run %s)", stage, data.rows or 0, data.short,
             model_label(start), name)
    began = time.monotonic()
    params = {"model": model, "train": train, "encode": encode, "ray": ray}
    child = (mlf.stage_run(stage, params=params, tags={"gram.cached": "false", "gram.live": "true"}, parent=tracking)
             if tracking is not None else contextlib.nullcontext())
    with child as handle, store.staging(stage) as folder:
        source = start.uri if isinstance(start, ArtifactRef) else start
        result = fit(stage, model_source=source, model_cfg=model, train_cfg=train, encode_cfg=encode,
                     data_path=data.file(TABLE_FILE), output_dir=str(folder), ray_cfg=ray, storage_path=ray_storage,
                     run_name=name, tracking=handle, on_progress=TrainingProgress(log, stage))
        final = {k: v for k, v in (result.get("final_metrics") or {}).items() if isinstance(v, (int, float))}
        meta = {"stage": stage, "steps": int(result.get("steps", 0)), "final_metrics": final,
                "data": data.sha256, "start": model_label(start), "run_name": name,
                "resumed_from_step": int(result.get("resumed_from_step", 0))}
        ref = store.publish(stage, folder, "model", meta=meta)
        if handle is not None:
            mlf.set_tags({"gram.artifact": ref.uri, "gram.sha256": ref.sha256, "gram.state": "Completed"},
                         run_id=handle.run_id)
    if "://" not in ray_storage:  # published: the run's checkpoints were only there to resume it
        shutil.rmtree(Path(ray_storage) / name, ignore_errors=True)
    log.info("%s: %d steps in %.0f s (resumed from step %d), final %s -> %s", stage, meta["steps"],
             time.monotonic() - began, meta["resumed_from_step"], json.dumps(final), ref.uri)
    return ref
