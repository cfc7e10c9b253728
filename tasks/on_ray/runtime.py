"""The Ray runtime the stages use: start or connect, GPUs, URIs every node reaches, and live progress.

Ray is imported only in this room (with ``train``, ``worker`` and ``judge``) and by the reward server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gram_core.config import TrainConfig
from tasks.settings import RayConfig, StatePaths
from tasks.store.leftover_processes import RuntimeRecord

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_runtime(ray_cfg: RayConfig, state: StatePaths | None = None) -> Iterator[None]:
    """Use the Ray runtime already initialized in this process, connect to ``ray_cfg.address`` /
    RAY_ADDRESS, or start a local one sized to the machine; disconnect/shut down only what we opened.

    A local runtime started here is recorded in ``state``'s folder (``tasks.store.leftover_processes``): if this
    process is killed before it shuts the runtime down, the next run that holds the folder stops what is left."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    record = None
    if address:
        ray.init(address=address)
    else:
        # Ray's token auth stays on (its default): the runtime listens on the host's address, not only loopback.
        # The node-preemption watcher only matters on clusters of preemptible nodes; on a local runtime it adds an
        # error-level "PreemptionWatcher" line to every stage when Train kills it at the end.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        record = RuntimeRecord(state.home) if state is not None else None
        with record or contextlib.nullcontext():
            ray.init(num_cpus=max(os.cpu_count() or 1, ray_cfg.num_workers * ray_cfg.cpus_per_worker),
                     include_dashboard=False, object_store_memory=ray_cfg.object_store_memory_mb * 1024 * 1024,
                     _temp_dir=short_temp_dir(),
                     # Without the dashboard there is no State API, and Ray Train's placement-group cleaner then
                     # warns every second for the whole run; errors still surface (and raise in the driver).
                     logging_config=ray.LoggingConfig(log_level="ERROR"))
    try:
        yield
    finally:
        try:
            ray.shutdown()
        except BaseException:
            if record is not None:
                record.stop()  # kept: the next holder of the folder stops what the failed shutdown left
            raise
        if record is not None:
            record.close()


def short_temp_dir() -> str:
    """Ray's session folder: RAY_TMPDIR, else /tmp/ray (its socket paths must stay under 107 bytes)."""
    folder = os.environ.get("RAY_TMPDIR") or "/tmp/ray"
    if len(folder) > 40:
        raise ValueError(f"Ray temp dir {folder!r} is too long for Unix socket paths (keep it under 40 chars)")
    return folder


def wants_gpu(setting: str) -> bool:
    import ray

    if setting == "auto":  # asking for a GPU the cluster lacks would wait forever
        return ray.cluster_resources().get("GPU", 0) > 0
    return setting == "true"


def reachable_uri(path: str) -> str:
    """A URI (absolute path) any process can open: fsspec URIs and hub ids pass through unchanged."""
    if "://" in path and not path.startswith("file://"):
        return path
    local = Path(path.removeprefix("file://")).expanduser()
    return str(local.resolve()) if local.exists() or path.startswith(("/", ".", "~", "file://")) else path


def uri_exists(uri: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs.isfile(path)


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


class ProgressRelay:
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
