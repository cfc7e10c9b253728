"""Run a training stage under Ray Train (the only module that imports Ray).

``fit`` starts (or connects to) a Ray runtime and runs ``gram_core.training`` in every Ray Train worker:
each worker loads the model and the data file, and the training loop shards every global batch across the
workers and all-reduces gradients itself (no DDP wrapper). Workers report to Ray only at checkpoints (each
report costs seconds); Ray persists the checkpoints under ``storage_path/run_name``, so calling ``fit``
again with the same ``run_name`` after an interruption continues from the last one. Rank 0 finally writes
a plain HF model folder (LoRA merged) and ``metrics.jsonl`` into ``output_dir``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gram_core.config import EncodeConfig, ModelConfig, TrainConfig, from_dict, to_dict
from gram_core.pipeline_config import RayConfig

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune", "bradley_terry")
METRICS_FILE = "metrics.jsonl"


def fit(stage: str, *, model_source: str, model_cfg: ModelConfig, train_cfg: TrainConfig, encode_cfg: EncodeConfig,
        data_path: str, output_dir: str, ray_cfg: RayConfig | None = None, storage_path: str | None = None,
        run_name: str, stop_at_step: int | None = None) -> dict[str, Any]:
    """Train ``stage`` ('pretrain': stage 1 on unlabeled pairs; 'finetune': the stage-2 judge; 'bradley_terry':
    the discriminative baseline) from ``model_source`` on the Arrow/Parquet file ``data_path``.

    ``stop_at_step`` ends the run at the first checkpoint at or after that step without writing the model
    (a time-boxed run); a later call with the same ``run_name`` continues. Returns dict(output_dir,
    metrics_path, final_metrics, steps, completed, resumed_from_step, run_name, checkpoint). On a multi-node
    cluster ``data_path``, ``output_dir`` and ``storage_path`` must be on storage every node reaches.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if stage not in STAGES:
        raise ValueError(f"fit: unknown stage {stage!r}; expected one of {list(STAGES)}")
    if not Path(data_path).is_file():
        raise FileNotFoundError(f"fit: data file {data_path} does not exist")
    ray_cfg = ray_cfg or RayConfig()
    storage = _storage_path(storage_path or ray_cfg.storage_path)
    loop_config = {"stage": stage, "model_source": str(model_source), "model_cfg": to_dict(model_cfg),
                   "train_cfg": to_dict(train_cfg), "encode_cfg": to_dict(encode_cfg),
                   "data_path": str(Path(data_path).resolve()), "output_dir": str(Path(output_dir).resolve()),
                   "stop_at_step": stop_at_step, "threads": ray_cfg.cpus_per_worker}
    with ray_runtime(ray_cfg):
        use_gpu = _use_gpu(ray_cfg.use_gpu)
        resources = {"CPU": ray_cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        trainer = TorchTrainer(
            train_loop, train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(name=run_name, storage_path=storage,
                                           failure_config=ray.train.FailureConfig(max_failures=ray_cfg.max_failures)))
        log.info("Ray Train run %s: %s with %d worker(s), storage %s", run_name, stage, ray_cfg.num_workers, storage)
        result = trainer.fit()
    reported = dict(result.metrics or {})
    metrics_path = Path(output_dir) / METRICS_FILE
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    final = history[-1] if history else {k: v for k, v in reported.items() if k != "resumed_from_step"}
    return {"output_dir": str(output_dir), "metrics_path": str(metrics_path), "final_metrics": final,
            "steps": int(final.get("step", 0)), "completed": metrics_path.exists(),
            "resumed_from_step": int(reported.get("resumed_from_step", 0)), "run_name": run_name,
            "checkpoint": result.checkpoint.path if result.checkpoint else None}


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
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # token auth is pointless for a private local runtime
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


def _use_gpu(setting: str) -> bool:
    import ray

    if setting == "auto":  # asking for a GPU the cluster lacks would wait forever
        return ray.cluster_resources().get("GPU", 0) > 0
    return setting == "true"


class _StopRun(Exception):
    """Raised inside a worker to end a time-boxed run right after a reported checkpoint."""


def train_loop(config: dict) -> None:
    """The Ray Train worker: load model and data, train (resuming from Ray's checkpoint), save on rank 0."""
    import ray.train
    import ray.train.torch
    import torch

    from gram_core.baseline import BTScorer, train_bradley_terry
    from gram_core.models import load_model, save_model
    from gram_core.scorers import judge_settings, write_judge_settings
    from gram_core.training import train_judge, train_pretrain

    torch.set_num_threads(int(config["threads"]))
    model_cfg = from_dict(ModelConfig, config["model_cfg"])
    train_cfg = from_dict(TrainConfig, config["train_cfg"])
    encode_cfg = from_dict(EncodeConfig, config["encode_cfg"])
    rank = ray.train.get_context().get_world_rank()
    model, tokenizer = load_model(model_cfg, source=config["model_source"])
    if torch.cuda.is_available() and ray.train.torch.get_device().type == "cuda":
        model.to(ray.train.torch.get_device())
    rows = read_rows(config["data_path"])
    checkpoint = ray.train.get_checkpoint()
    local = tempfile.mkdtemp(prefix="gram-ckpt-")
    resumed = {"from": 0}

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

    trainers = {"pretrain": train_pretrain, "finetune": train_judge, "bradley_terry": train_bradley_terry}
    try:
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_from:
            if resume_from is not None:
                resumed["from"] = json.loads((Path(resume_from) / "trainer_state.json").read_text())["step"]
            out = trainers[config["stage"]](model, tokenizer, rows, train_cfg, encode_cfg, output_dir=local,
                                            resume_from=resume_from, on_metrics=on_metrics,
                                            on_checkpoint=on_checkpoint)
    except _StopRun:
        return
    finally:
        shutil.rmtree(local, ignore_errors=True)
    if rank != 0:
        return
    if config["stage"] == "bradley_terry":
        reward_model, result = out
        scorer = BTScorer(reward_model, tokenizer, encode_cfg.max_length, system_prompt=encode_cfg.system_prompt)
        write_output(config["output_dir"], result.history, scorer.save)
    elif config["stage"] == "finetune":
        def save_judge(folder):
            save_model(model, tokenizer, folder)
            write_judge_settings(folder, judge_settings(encode_cfg, tokenizer))

        write_output(config["output_dir"], out.history, save_judge)
    else:
        write_output(config["output_dir"], out.history, lambda folder: save_model(model, tokenizer, folder))


def read_rows(path: str) -> list[dict]:
    """Rows of a Parquet or Arrow (IPC file or stream) table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    try:
        with pa.memory_map(path) as source:
            return pa.ipc.open_file(source).read_all().to_pylist()
    except pa.ArrowInvalid:
        with pa.memory_map(path) as source:
            return pa.ipc.open_stream(source).read_all().to_pylist()


def write_output(output_dir: str, history: list[dict], save) -> None:
    """``save(folder)`` + metrics.jsonl into a temp folder, then renamed to ``output_dir`` (replaced if present)."""
    target = Path(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save(tmp)
        (tmp / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in history))
        if target.exists() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            shutil.rmtree(old)
        os.replace(tmp, target)  # replaces an empty folder (e.g. a staging folder) atomically
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
