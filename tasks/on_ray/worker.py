"""The Ray Train worker of a training stage: what runs in every worker process (``train_loop``).

Each worker loads the start model and the training rows from URIs every node reaches, looks its stage up in
``gram_core.stages`` and trains it with ``gram_core.training`` (which shards every global batch across the
workers), reporting to Ray only at checkpoints. Rank 0 writes the final checkpoint: the stage's model folder,
the training history and a marker written last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gram_core.artifact_files import FINAL_FILE, MODEL_DIR, STATE_FILE, TRAIN_HISTORY_FILE
from gram_core.config import EncodeConfig, ModelConfig, TrainConfig
from tasks.on_ray.runtime import local_copy
from tasks.store.artifacts import write_history_rows

if TYPE_CHECKING:
    from gram_core.stages import Stage




@dataclasses.dataclass(frozen=True)
class WorkerJob:
    """What every Ray Train worker is handed, explicitly (workers read no environment variable for it)."""

    stage: str  # a training stage of gram_core.stages.STAGES
    model: ModelConfig
    train: TrainConfig
    encode: EncodeConfig
    model_source: str  # a URI every worker reaches
    data_uri: str
    threads: int
    scratch_dir: str | None  # checkpoint scratch under a local storage folder (cleaned of killed runs' leftovers)
    stop_at_step: int | None = None
    tracking: Any = None  # the stage's MLflow run handle: rank 0 logs every step to it
    progress: Any = None  # a Ray queue to the driver's progress relay


class _StopRun(Exception):
    """Raised inside a worker to end a time-boxed run right after a reported checkpoint."""


def train_loop(config: dict) -> None:
    """The Ray Train worker: load model and data, train the stage (resuming from Ray's checkpoint), and report
    the final model checkpoint (rank 0 writes it; every rank takes part in the report)."""
    import ray.train
    import torch

    from gram_core.sharding import full_state_dict
    from gram_core.stages import training_stage

    job: WorkerJob = config["job"]
    stage = training_stage(job.stage)
    torch.set_num_threads(int(job.threads))
    quiet_console()
    rank = ray.train.get_context().get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            if final_marker(folder) is not None:
                return  # the run already finished: its final checkpoint is the result
    local = _scratch_folder(job.scratch_dir)
    model, tokenizer = _load_model(job, local)
    rows = read_rows(job.data_uri)
    resumed = {"from": 0}
    on_checkpoint, on_metrics = _reporters(job, rank, resumed)
    try:
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_from:
            if resume_from is not None:
                resumed["from"] = json.loads((Path(resume_from) / STATE_FILE).read_text())["step"]
            trained, result = stage.train(model, tokenizer, rows, job.train, job.encode, output_dir=local,
                                          resume_from=resume_from, on_metrics=on_metrics,
                                          on_checkpoint=on_checkpoint)
        state = full_state_dict(trained)  # sharded: every rank takes part in gathering the weights to rank 0
        final = Path(local) / "final"
        if rank == 0:
            write_final_checkpoint(final, functools.partial(_save_as, stage, trained, tokenizer, job.encode, state),
                                   result.history, job.stage)
        ray.train.report({**result.final_metrics, "resumed_from_step": resumed["from"]},
                         checkpoint=ray.train.Checkpoint.from_directory(str(final)) if rank == 0 else None,
                         checkpoint_dir_name=f"model-{result.steps}", delete_local_checkpoint_after_upload=rank == 0)
    except _StopRun:
        return
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _save_as(stage: Stage, trained: Any, tokenizer: Any, encode: EncodeConfig, state: dict | None,
             folder: Path) -> None:
    stage.save(trained, tokenizer, encode, folder, state)


def _load_model(job: WorkerJob, scratch: str) -> tuple[Any, Any]:
    """The start model on this worker's device (a remote source is copied to scratch first)."""
    import ray.train.torch
    import torch

    from gram_core.models import load_model

    with local_copy(job.model_source, scratch) as source:
        model, tokenizer = load_model(job.model, source=source)
    if torch.cuda.is_available() and ray.train.torch.get_device().type == "cuda":
        model.to(ray.train.torch.get_device())
    return model, tokenizer


def _reporters(job: WorkerJob, rank: int, resumed: dict[str, int]) -> tuple[Callable, Callable]:
    """(on_checkpoint, on_metrics) for ``train``: report checkpoints to Ray (ending a time-boxed run after
    ``job.stop_at_step``); rank 0 prints each step and sends it to MLflow and the driver's progress."""
    import ray.train

    live = _live_metrics(job.tracking, job.progress) if rank == 0 else None

    def on_checkpoint(path: str | None, metrics: dict) -> None:
        step = int(metrics["step"])
        ray.train.report({**metrics, "resumed_from_step": resumed["from"]},
                         checkpoint=ray.train.Checkpoint.from_directory(path) if path else None,
                         checkpoint_dir_name=f"checkpoint-{step}", delete_local_checkpoint_after_upload=bool(path))
        if job.stop_at_step is not None and step >= job.stop_at_step:
            raise _StopRun

    def on_metrics(step: int, metrics: dict) -> None:
        if rank == 0:  # Ray forwards worker stdout to the driver's console, prefixed with the worker
            shown = " ".join(f"{k.removeprefix('train/')}={v:.4g}" for k, v in metrics.items() if k.startswith("train/"))
            # Not print(): Ray Train patches it to also log through its logger, so each line showed twice.
            sys.stdout.write(f"{job.stage} step {step} (epoch {metrics.get('epoch', 0):.2f}): {shown}\n")
            sys.stdout.flush()
            if live is not None:
                live(step, metrics)

    return on_checkpoint, on_metrics


def final_marker(folder: str | None) -> dict | None:
    """The final checkpoint's marker when ``folder`` holds a complete model, else None."""
    if folder is None:
        return None
    marker, model = Path(folder) / FINAL_FILE, Path(folder) / MODEL_DIR
    if not marker.is_file() or not (model / "config.json").is_file() or not (Path(folder) / TRAIN_HISTORY_FILE).is_file():
        return None
    return json.loads(marker.read_text())


# Ray Train's per-report INFO lines: one pair per checkpoint, noise on the console; Ray's session log files keep them.
CONSOLE_NOISE = ("Reporting training result", "Checkpoint successfully created")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CONSOLE_NOISE)


def quiet_console() -> None:
    """Keep CONSOLE_NOISE off the console handlers Ray Train gives a worker (root and ``ray.train``); its
    file handlers (``ray-train-*-worker-*.log`` under the session's logs) still write them."""
    for name in (None, "ray.train"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler" \
                    and not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())


def write_final_checkpoint(folder: Path, save: Callable[[Path], Any], history: list[dict], stage: str) -> None:
    """model/ (``save(folder)``), metrics.jsonl, then the marker last: a folder without it is incomplete."""
    folder.mkdir(parents=True)
    save(folder / MODEL_DIR)
    write_history_rows(folder, history)
    (folder / FINAL_FILE).write_text(json.dumps({"stage": stage, "steps": len(history)}))


def _scratch_folder(parent: str | None) -> str:
    """A fresh checkpoint scratch folder: under ``parent`` (the local Ray storage, cleaned of killed runs'
    leftovers at the next start) when this worker can write there, else in the system temp folder."""
    if parent:
        try:
            os.makedirs(parent, exist_ok=True)
            return tempfile.mkdtemp(prefix="gram-ckpt-", dir=parent)
        except OSError:
            pass
    return tempfile.mkdtemp(prefix="gram-ckpt-")


def _live_metrics(tracking: Any, progress: Any) -> Callable[[int, dict], None] | None:
    """Rank 0's per-step sink: the stage's MLflow run (when given) and the driver's progress queue."""
    if tracking is None and progress is None:
        return None
    log_step = None
    if tracking is not None:
        from tasks.on_mlflow.tracking import step_logger

        log_step = step_logger(tracking)

    def live(step: int, metrics: dict) -> None:
        if log_step is not None:
            log_step(step, metrics)
        if progress is not None:
            progress.put((step, float(metrics.get("epoch", 0.0))))

    return live


def read_rows(uri: str) -> list[dict]:
    """Rows of a Parquet or Arrow (IPC file or stream) table at a local path or fsspec URI."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fsspec.open(uri, "rb") as handle:
        data = handle.read()
    if uri.endswith(".parquet"):
        return pq.read_table(pa.BufferReader(data)).to_pylist()
    try:
        return pa.ipc.open_file(pa.BufferReader(data)).read_all().to_pylist()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.BufferReader(data)).read_all().to_pylist()
