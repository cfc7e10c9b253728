"""Run a training stage under Ray Train (the only module that imports Ray).

``fit`` starts (or connects to) a Ray runtime and runs ``gram_core.training`` in every Ray Train worker:
each worker loads the model and reads the training data from a URI every node reaches (a path on shared
storage or an fsspec URI), and the training loop shards every global batch across the workers. Workers
report to Ray only at checkpoints (each report costs seconds); Ray persists the checkpoints under
``storage_path/run_name`` (the newest ``ray.checkpoints_to_keep``), so calling ``fit`` again with the same
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
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gram_core.config import EncodeConfig, ModelConfig, TrainConfig, from_dict, to_dict
from tasks.settings import RayConfig
from tasks.state import SCRATCH

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune", "bradley_terry")
METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"  # inside the final checkpoint: the trained HF folder
FINAL_FILE = "final.json"  # inside the final checkpoint, written last: {"stage", "steps"}


class IncompleteTrainingError(RuntimeError):
    """Ray Train finished without a complete final model checkpoint; nothing may be published."""


def fit(stage: str, *, model_source: str, model_cfg: ModelConfig, train_cfg: TrainConfig, encode_cfg: EncodeConfig,
        data_path: str, output_dir: str, ray_cfg: RayConfig | None = None, storage_path: str | None = None,
        run_name: str, stop_at_step: int | None = None, tracking: Any = None,
        on_progress: Callable[[int, float], Any] | None = None) -> dict[str, Any]:
    """Train ``stage`` ('pretrain': stage 1 on unlabeled pairs; 'finetune': the stage-2 judge; 'bradley_terry':
    the discriminative baseline) from ``model_source`` on the Arrow/Parquet table at ``data_path`` (a path or
    fsspec URI), and copy the trained model from the final Ray checkpoint into ``output_dir`` (driver side).

    ``stop_at_step`` ends the run at the first checkpoint at or after that step without a model (a
    time-boxed run; ``completed`` False); a later call with the same ``run_name`` continues. ``tracking``
    (a ``tasks.tracking.RunHandle``) receives rank 0's per-step metrics live; ``on_progress(step, fraction)``
    runs on the driver during training. Returns dict(output_dir, metrics_path, final_metrics, steps,
    completed, resumed_from_step, run_name, checkpoint). On a multi-node cluster ``data_path``,
    ``model_source`` and ``storage_path`` must be on storage every node reaches; ``output_dir`` is the
    driver's own.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if stage not in STAGES:
        raise ValueError(f"fit: unknown stage {stage!r}; expected one of {list(STAGES)}")
    data_uri = reachable_uri(data_path)
    if not _exists(data_uri):
        raise FileNotFoundError(f"fit: data file {data_path} does not exist")
    ray_cfg = ray_cfg or RayConfig()
    storage = _storage_path(storage_path or ray_cfg.storage_path)
    loop_config = {"stage": stage, "model_source": reachable_uri(str(model_source)),
                   "model_cfg": to_dict(model_cfg), "train_cfg": to_dict(train_cfg),
                   "encode_cfg": to_dict(encode_cfg), "data_uri": data_uri, "stop_at_step": stop_at_step,
                   "threads": ray_cfg.cpus_per_worker, "tracking": tracking,
                   # Checkpoint scratch under a local storage folder, so the next start can remove a killed run's.
                   "scratch_dir": None if "://" in storage else str(Path(storage) / SCRATCH)}
    with ray_runtime(ray_cfg):
        use_gpu = wants_gpu(ray_cfg.use_gpu)
        resources = {"CPU": ray_cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        progress = _ProgressRelay(on_progress, train_cfg) if on_progress else None
        loop_config["progress"] = progress.queue if progress else None
        trainer = TorchTrainer(
            train_loop, train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=storage,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ray_cfg.checkpoints_to_keep),
                failure_config=ray.train.FailureConfig(max_failures=ray_cfg.max_failures)))
        log.info("Ray Train run %s: %s with %d worker(s), storage %s", run_name, stage, ray_cfg.num_workers, storage)
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
        final = _final_marker(folder)
        if final is None:
            if expect_model:
                raise IncompleteTrainingError(
                    f"Ray Train run {run_name} ended without a complete model checkpoint (last checkpoint: "
                    f"{base['checkpoint']}); nothing was published. Re-run to resume from it.")
            metrics = {k: v for k, v in reported.items() if k != "resumed_from_step"}
            return {**base, "metrics_path": None, "final_metrics": metrics, "steps": int(metrics.get("step", 0)),
                    "completed": False}
        write_output(output_dir, lambda target: _copy_tree(Path(folder) / MODEL_DIR, target),
                     (Path(folder) / METRICS_FILE).read_text())
    history = [json.loads(line) for line in (Path(output_dir) / METRICS_FILE).read_text().splitlines()]
    if len(history) != final["steps"]:
        raise IncompleteTrainingError(f"Ray Train run {run_name}: {METRICS_FILE} has {len(history)} steps, the "
                                      f"final checkpoint says {final['steps']}")
    return {**base, "metrics_path": str(Path(output_dir) / METRICS_FILE), "final_metrics": history[-1] if history
            else {}, "steps": final["steps"], "completed": True}


def _final_marker(folder: str | None) -> dict | None:
    """The final checkpoint's marker when ``folder`` holds a complete model, else None."""
    if folder is None:
        return None
    marker, model = Path(folder) / FINAL_FILE, Path(folder) / MODEL_DIR
    if not marker.is_file() or not (model / "config.json").is_file() or not (Path(folder) / METRICS_FILE).is_file():
        return None
    return json.loads(marker.read_text())


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, dirs_exist_ok=True)


def reachable_uri(path: str) -> str:
    """A URI (absolute path) any process can open: fsspec URIs and hub ids pass through unchanged."""
    if "://" in path and not path.startswith("file://"):
        return path
    local = Path(path.removeprefix("file://")).expanduser()
    return str(local.resolve()) if local.exists() or path.startswith(("/", ".", "~", "file://")) else path


def _exists(uri: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs.isfile(path)


class _ProgressRelay:
    """Carries rank 0's (step, epoch) from the workers to the driver through a Ray queue, and calls
    ``on_progress(step, fraction)`` from a driver thread while ``trainer.fit()`` blocks."""

    def __init__(self, on_progress: Callable[[int, float], Any], train_cfg: TrainConfig) -> None:
        from ray.util.queue import Queue

        self.on_progress, self.train_cfg = on_progress, train_cfg
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gram-progress", daemon=True)
        self.thread.start()

    def fraction(self, step: int, epoch: float) -> float:
        cfg = self.train_cfg
        return min(1.0, step / cfg.max_steps if cfg.max_steps > 0 else epoch / cfg.epochs)

    def _deliver(self, item: tuple[int, float]) -> None:
        try:
            self.on_progress(item[0], self.fraction(*item))
        except Exception as err:  # noqa: BLE001 - progress display must never fail the training run
            log.warning("progress callback failed: %s", err)

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self.stopped.is_set():
            try:
                self._deliver(self.queue.get(timeout=0.5))
            except Empty:
                continue

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        while not self.queue.empty():  # whatever arrived after the thread's last poll
            self._deliver(self.queue.get_nowait())
        self.queue.shutdown()


@contextlib.contextmanager
def ray_runtime(ray_cfg: RayConfig) -> Iterator[None]:
    """Use the Ray runtime already initialized in this process, connect to ``ray_cfg.address`` /
    RAY_ADDRESS, or start a local one sized to the machine; disconnect/shut down only what we opened."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # Ray's token auth stays on (its default): the runtime listens on the host's address, not only loopback.
        # The node-preemption watcher only matters on clusters of preemptible nodes; on a local runtime it adds an
        # error-level "PreemptionWatcher" line to every stage when Train kills it at the end.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(num_cpus=max(os.cpu_count() or 1, ray_cfg.num_workers * ray_cfg.cpus_per_worker),
                 include_dashboard=False, object_store_memory=ray_cfg.object_store_memory_mb * 1024 * 1024,
                 _temp_dir=short_temp_dir(),
                 # Without the dashboard there is no State API, and Ray Train's placement-group cleaner then
                 # warns every second for the whole run; errors still surface (and raise in the driver).
                 logging_config=ray.LoggingConfig(log_level="ERROR"))
    try:
        yield
    finally:
        ray.shutdown()


def short_temp_dir() -> str:
    """Ray's session folder: RAY_TMPDIR, else /tmp/ray (its socket paths must stay under 107 bytes)."""
    folder = os.environ.get("RAY_TMPDIR") or "/tmp/ray"
    if len(folder) > 40:
        raise ValueError(f"Ray temp dir {folder!r} is too long for Unix socket paths (keep it under 40 chars)")
    return folder


def _storage_path(path: str | None) -> str:
    if path and "://" in path:
        return path  # a cloud URI every node can reach
    home = Path(os.environ.get("GRAM_HOME", ".gram"))
    return str(Path(path or home / "ray_storage").expanduser().resolve())


def wants_gpu(setting: str) -> bool:
    import ray

    if setting == "auto":  # asking for a GPU the cluster lacks would wait forever
        return ray.cluster_resources().get("GPU", 0) > 0
    return setting == "true"


class _StopRun(Exception):
    """Raised inside a worker to end a time-boxed run right after a reported checkpoint."""


def train_loop(config: dict) -> None:
    """The Ray Train worker: load model and data, train (resuming from Ray's checkpoint), and report the
    final model checkpoint (rank 0 writes it; every rank takes part in the report)."""
    import ray.train
    import ray.train.torch
    import torch

    from gram_core.baseline import BTScorer, train_bradley_terry
    from gram_core.judge_settings import judge_settings, write_judge_settings
    from gram_core.models import load_model, save_model
    from gram_core.sharding import full_state_dict
    from gram_core.training import train_judge, train_pretrain

    torch.set_num_threads(int(config["threads"]))
    quiet_console()
    model_cfg = from_dict(ModelConfig, config["model_cfg"])
    train_cfg = from_dict(TrainConfig, config["train_cfg"])
    encode_cfg = from_dict(EncodeConfig, config["encode_cfg"])
    rank = ray.train.get_context().get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            if _final_marker(folder) is not None:
                return  # the run already finished: its final checkpoint is the result
    local = _scratch_folder(config.get("scratch_dir"))
    with local_copy(config["model_source"], local) as source:
        model, tokenizer = load_model(model_cfg, source=source)
    if torch.cuda.is_available() and ray.train.torch.get_device().type == "cuda":
        model.to(ray.train.torch.get_device())
    rows = read_rows(config["data_uri"])
    resumed = {"from": 0}
    live = _live_metrics(config.get("tracking"), config.get("progress")) if rank == 0 else None

    def on_checkpoint(path: str | None, metrics: dict) -> None:
        step = int(metrics["step"])
        ray.train.report({**metrics, "resumed_from_step": resumed["from"]},
                         checkpoint=ray.train.Checkpoint.from_directory(path) if path else None,
                         checkpoint_dir_name=f"checkpoint-{step}", delete_local_checkpoint_after_upload=bool(path))
        stop = config["stop_at_step"]
        if stop is not None and step >= stop:
            raise _StopRun

    def on_metrics(step: int, metrics: dict) -> None:
        if rank == 0:  # Ray forwards worker stdout to the driver's console, prefixed with the worker
            shown = " ".join(f"{k.removeprefix('train/')}={v:.4g}" for k, v in metrics.items() if k.startswith("train/"))
            # Not print(): Ray Train patches it to also log through its logger, so each line showed twice.
            sys.stdout.write(f"{config['stage']} step {step} (epoch {metrics.get('epoch', 0):.2f}): {shown}\n")
            sys.stdout.flush()
            if live is not None:
                live(step, metrics)

    trainers = {"pretrain": train_pretrain, "finetune": train_judge, "bradley_terry": train_bradley_terry}
    try:
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_from:
            if resume_from is not None:
                resumed["from"] = json.loads((Path(resume_from) / "trainer_state.json").read_text())["step"]
            out = trainers[config["stage"]](model, tokenizer, rows, train_cfg, encode_cfg, output_dir=local,
                                            resume_from=resume_from, on_metrics=on_metrics,
                                            on_checkpoint=on_checkpoint)
        trained, result = out if config["stage"] == "bradley_terry" else (model, out)
        state = full_state_dict(trained)  # sharded: every rank takes part in gathering the weights to rank 0
        if config["stage"] == "bradley_terry":
            scorer = BTScorer(trained, tokenizer, encode_cfg.max_length, system_prompt=encode_cfg.system_prompt)

            def save(folder):
                scorer.save(folder, state_dict=state)
        elif config["stage"] == "finetune":  # a judge records the settings it must be read out with

            def save(folder):
                save_model(model, tokenizer, folder, state_dict=state)
                write_judge_settings(folder, judge_settings(encode_cfg, tokenizer))
        else:
            save = lambda folder: save_model(model, tokenizer, folder, state_dict=state)  # noqa: E731
        final = Path(local) / "final"
        if rank == 0:
            write_final_checkpoint(final, save, result.history, config["stage"])
        ray.train.report({**result.final_metrics, "resumed_from_step": resumed["from"]},
                         checkpoint=ray.train.Checkpoint.from_directory(str(final)) if rank == 0 else None,
                         checkpoint_dir_name=f"model-{result.steps}", delete_local_checkpoint_after_upload=rank == 0)
    except _StopRun:
        return
    finally:
        shutil.rmtree(local, ignore_errors=True)


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
    (folder / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in history))
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


@contextlib.contextmanager
def local_copy(source: str, scratch: str) -> Iterator[str]:
    """A model source every worker can load: remote fsspec folders are downloaded to scratch first."""
    if "://" not in source or source.startswith("file://"):
        yield source.removeprefix("file://")
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    target = Path(scratch) / "model-source"
    fs.get(path, str(target), recursive=True)
    try:
        yield str(target)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def _live_metrics(tracking: Any, progress: Any) -> Callable[[int, dict], None] | None:
    """Rank 0's per-step sink: the stage's MLflow run (when given) and the driver's progress queue."""
    if tracking is None and progress is None:
        return None
    log_step = None
    if tracking is not None:
        from tasks.tracking import step_logger

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


def write_output(output_dir: str, save, metrics_jsonl: str) -> None:
    """``save(folder)`` + metrics.jsonl into a temp folder, then renamed to ``output_dir`` (replaced if present)."""
    target = Path(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save(tmp)
        (tmp / METRICS_FILE).write_text(metrics_jsonl)
        if target.exists() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            shutil.rmtree(old)
        os.replace(tmp, target)  # replaces an empty folder (e.g. a staging folder) atomically
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
