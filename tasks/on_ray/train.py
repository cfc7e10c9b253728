"""Run a training stage under Ray Train, driver side (the worker is ``tasks.on_ray.worker``).

``fit`` starts (or connects to) a Ray runtime and runs ``gram_core.training`` in every Ray Train worker:
each worker loads the model and reads the training data from a URI every node reaches (a path on shared
storage or an fsspec URI), and the training loop shards every global batch across the workers. Workers
report to Ray only at checkpoints (each report costs seconds); Ray persists the checkpoints under
``<ray storage>/run_name`` (the newest ``ray.checkpoints_to_keep``), so calling ``fit`` again with the same
``run_name`` after an interruption continues from the last one. The trained model comes back the same way:
rank 0 reports a final checkpoint holding the HF model folder (LoRA merged; under ``train.sharding`` fsdp the
full weights are gathered from every rank first) and ``metrics.jsonl``; the
driver checks the result (error, completeness) and copies that checkpoint into ``output_dir``. Workers never
touch the driver's disk.

Live progress: with a ``tracking`` run handle rank 0 logs every step's metrics to that MLflow run as it
trains, and ``on_progress(step, fraction)`` is called on the driver while the workers train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gram_core.artifact_files import MODEL_DIR, TRAIN_HISTORY_FILE
from gram_core.folders import write_folder
from tasks.on_ray.runtime import ProgressRelay, ray_runtime, reachable_uri, uri_exists, wants_gpu
from tasks.on_ray.worker import WorkerJob, final_marker, train_loop
from tasks.settings import StageSettings
from tasks.store.artifacts import read_history_rows, write_train_history
from tasks.store.state import SCRATCH

log = logging.getLogger(__name__)



class IncompleteTrainingError(RuntimeError):
    """Ray Train finished without a complete final model checkpoint; nothing may be published."""


def fit(settings: StageSettings, *, model_source: str, data_path: str, output_dir: str, run_name: str,
        stop_at_step: int | None = None, tracking: Any = None,
        on_progress: Callable[[int, float], Any] | None = None) -> dict[str, Any]:
    """Train ``settings.stage`` ('pretrain': stage 1 on unlabeled pairs; 'finetune': the stage-2 judge;
    'bradley_terry': the discriminative baseline) from ``model_source`` on the Arrow/Parquet table at
    ``data_path`` (a path or fsspec URI), and copy the trained model from the final Ray checkpoint into
    ``output_dir`` (driver side). Ray settings are ``settings.runtime``, checkpoints go to
    ``settings.store.ray_storage``.

    ``stop_at_step`` ends the run at the first checkpoint at or after that step without a model (a
    time-boxed run; ``completed`` False); a later call with the same ``run_name`` continues. ``tracking``
    (a ``tasks.on_mlflow.tracking.RunHandle``) receives rank 0's per-step metrics live; ``on_progress(step, fraction)``
    runs on the driver during training. Returns dict(output_dir, metrics_path, final_metrics, steps,
    completed, resumed_from_step, run_name, checkpoint). On a multi-node cluster ``data_path``,
    ``model_source`` and the storage must be on storage every node reaches; ``output_dir`` is the driver's own.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from gram_core.stages import training_stage  # torch and transformers: loaded only when a stage trains

    training_stage(settings.stage)  # an unknown stage fails here, before Ray starts
    data_uri = reachable_uri(data_path)
    if not uri_exists(data_uri):
        raise FileNotFoundError(f"fit: data file {data_path} does not exist")
    runtime, storage = settings.runtime, _storage_path(settings.store.ray_storage)
    job = WorkerJob(stage=settings.stage, model=settings.model, train=settings.train, encode=settings.encode,
                    model_source=reachable_uri(str(model_source)), data_uri=data_uri,
                    threads=runtime.cpus_per_worker, stop_at_step=stop_at_step, tracking=tracking,
                    scratch_dir=None if "://" in storage else str(Path(storage) / SCRATCH))
    with ray_runtime(runtime, settings.store):
        use_gpu = wants_gpu(runtime.use_gpu)
        resources = {"CPU": runtime.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        progress = ProgressRelay(on_progress, settings.train) if on_progress else None
        job = dataclasses.replace(job, progress=progress.queue if progress else None)
        trainer = TorchTrainer(
            train_loop, train_loop_config={"job": job},
            scaling_config=ray.train.ScalingConfig(num_workers=runtime.num_workers, use_gpu=use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=storage,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=runtime.checkpoints_to_keep),
                failure_config=ray.train.FailureConfig(max_failures=runtime.max_failures)))
        log.info("Ray Train run %s: %s with %d worker(s), storage %s", run_name, settings.stage,
                 runtime.num_workers, storage)
        try:
            result = trainer.fit()
        finally:
            if progress:
                progress.close()
    return collect_model(result, output_dir, run_name, expect_model=stop_at_step is None)


def collect_model(result: Any, output_dir: str, run_name: str, expect_model: bool = True) -> dict[str, Any]:
    """Check a Ray Train result and copy its final model checkpoint into ``output_dir`` (driver side).

    Raises the run's error, or ``IncompleteTrainingError`` when the last checkpoint is not a complete model
    (unless ``expect_model`` is False: a time-boxed run, reported with ``completed`` False).
    """
    if result.error is not None:
        raise result.error
    reported = dict(result.metrics or {})
    checkpoint = result.checkpoint
    base = {"output_dir": str(output_dir), "run_name": run_name,
            "resumed_from_step": int(reported.get("resumed_from_step", 0)),
            "checkpoint": checkpoint.path if checkpoint else None}
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as folder:
        final = final_marker(folder)
        if final is None:
            if expect_model:
                raise IncompleteTrainingError(
                    f"Ray Train run {run_name} ended without a complete model checkpoint (last checkpoint: "
                    f"{base['checkpoint']}); nothing was published. Re-run to resume from it.")
            metrics = {k: v for k, v in reported.items() if k != "resumed_from_step"}
            return {**base, "metrics_path": None, "final_metrics": metrics, "steps": int(metrics.get("step", 0)),
                    "completed": False}
        write_folder(output_dir, functools.partial(_copy_model, Path(folder)))  # replaces an empty staging folder
    history = read_history_rows(Path(output_dir))
    if len(history) != final["steps"]:
        raise IncompleteTrainingError(f"Ray Train run {run_name}: {TRAIN_HISTORY_FILE} has {len(history)} steps, the "
                                      f"final checkpoint says {final['steps']}")
    return {**base, "metrics_path": str(Path(output_dir) / TRAIN_HISTORY_FILE), "final_metrics": history[-1] if history
            else {}, "steps": final["steps"], "completed": True}


def _copy_model(checkpoint: Path, target: Path) -> None:
    """The trained model folder and its training history, out of the final checkpoint."""
    shutil.copytree(checkpoint / MODEL_DIR, target, dirs_exist_ok=True)
    write_train_history(target, read_history_rows(checkpoint))


def _storage_path(path: str) -> str:
    if "://" in path:
        return path  # a cloud URI every node can reach
    return str(Path(path).expanduser().resolve())
