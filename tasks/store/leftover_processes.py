"""The processes of a local Ray runtime, recorded in the state folder, so that a ``kill -9`` of the driver does
not leave them running beside the next run.

A driver killed with SIGKILL takes Ray's head processes (``gcs_server``, ``raylet``, ...) with it, but not what
they started: measured on a local runtime, a Ray worker kept running its task for ~2 s after the kill, and
``ray::DashboardAgent`` / ``ray::RuntimeEnvAgent`` lived on for 5 to over 45 s, all reparented to init (the
killed driver's process tree no longer leads to them), the workers in process groups of their own.

So a run that starts a local runtime (``tasks.on_ray.runtime.ray_runtime``; never when it connects to a cluster by
address) keeps ``<home>/.ray-processes.json`` (each write atomic): its own pid and process start time, a random
mark that it puts into the environment Ray's processes inherit (``GRAM_RAY_RUNTIME=<mark>``, only while
``ray.init`` starts them), and the pid and start time of every process of the runtime: those that carry the
mark and, walking the parent pids, their descendants. The list is written after ``ray.init`` and kept current
once a second while the runtime runs (``ray::`` processes rewrite their command line over their environment, so
the mark alone does not find them all, but while the driver lives every one of them descends from it). A clean
shutdown removes the record.

The next process that holds the state folder (``tasks.store.state.hold_state_folder``; ``gram gc`` too) calls
``stop_leftovers``: if the recorded driver is dead, it SIGKILLs every recorded process that is still alive with
the recorded start time (a reused pid is never touched), every process that carries the mark, and their
descendants, waits until they are gone (at most 30 s), logs how many it stopped, and removes the record.

Linux only (``/proc``); elsewhere nothing is found, so nothing is stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import threading
import time
from pathlib import Path

from gram_core.folders import write_json

RECORD = ".ray-processes.json"
MARK = "GRAM_RAY_RUNTIME"
PROC = Path("/proc")
REFRESH_S = 1.0

log = logging.getLogger("gram")

Processes = dict[int, tuple[int, int, str]]  # pid -> (parent pid, start time, state)


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks since boot, state letter) of a process, or None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
        fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
        return int(fields[1]), int(fields[19]), fields[0]
    except (OSError, ValueError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return stat[1] if stat else None


def _processes() -> Processes:
    """Every process but zombies (they have ended)."""
    found = {}
    with contextlib.suppress(OSError):
        for entry in PROC.iterdir():
            if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[2] != "Z":
                found[int(entry.name)] = stat
    return found


def _alive(pid: int, start: int) -> bool:
    """The process ``pid`` that started at ``start`` still runs (a zombie has ended; a reused pid is another)."""
    stat = _stat(pid)
    return stat is not None and stat[1] == start and stat[2] != "Z"


def _carries(pid: int, mark: str) -> bool:
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return False
    return f"{MARK}={mark}".encode() in environ.split(b"\0")


def _runtime_processes(mark: str, known: dict[int, int]) -> dict[int, int]:
    """pid -> start time of the live processes of the runtime: those of ``known`` (pid -> start time) still
    alive as themselves, those that carry ``mark``, and all their descendants; never this process."""
    processes = _processes()
    found = {pid for pid, start in known.items() if processes.get(pid, (0, None))[1] == start}
    found |= {pid for pid in processes if pid not in found and _carries(pid, mark)}
    while children := {pid for pid, (ppid, _, _) in processes.items() if ppid in found} - found:
        found |= children
    return {pid: processes[pid][1] for pid in found - {os.getpid(), 1}}


class RuntimeRecord:
    """The record of the local Ray runtime this process starts: ``with record: ray.init(...)``, then
    ``close()`` after a clean ``ray.shutdown()``."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / RECORD
        me = os.getpid()
        self.driver, self.mark = {"pid": me, "start": start_time(me)}, secrets.token_hex(16)
        self.processes: dict[int, int] = {}
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def _save(self) -> None:
        write_json(self.path, {"driver": self.driver, "mark": self.mark,
                           "processes": [{"pid": pid, "start": start} for pid, start in sorted(self.processes.items())]})

    def __enter__(self) -> RuntimeRecord:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._save()  # before the first Ray process exists
        self.before = os.environ.get(MARK)
        os.environ[MARK] = self.mark  # inherited by the Ray processes ray.init starts
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.before is None:
            os.environ.pop(MARK, None)
        else:
            os.environ[MARK] = self.before
        self.refresh()
        if exc_type is None:  # the runtime runs: keep the list current until close()
            self.thread = threading.Thread(target=self._keep, name="gram-ray-record", daemon=True)
            self.thread.start()

    def refresh(self) -> None:
        processes = _runtime_processes(self.mark, self.processes)
        if processes != self.processes:
            self.processes = processes
            self._save()

    def _keep(self) -> None:
        while not self.stopped.wait(REFRESH_S):
            try:
                self.refresh()
            except OSError as err:  # a full disk must not fail the run; the record is a safety net
                log.warning("could not update %s: %s", self.path, err)

    def stop(self) -> None:
        """Stop keeping the list current (the record stays)."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    def close(self) -> None:
        """After a clean shutdown: nothing of this runtime is left to stop."""
        self.stop()
        self.path.unlink(missing_ok=True)


def stop_leftovers(home: Path, timeout: float = 30.0) -> int:
    """Stop what is left of the local Ray runtime recorded in ``home`` by a run that died without shutting it
    down (call only while holding the state folder). Returns how many processes were stopped."""
    path = Path(home) / RECORD
    try:
        record = json.loads(path.read_text())
        driver, mark = record["driver"], str(record["mark"])
        recorded = {int(p["pid"]): int(p["start"]) for p in record["processes"]}
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError):  # written atomically, so this is not a torn record
        log.warning("unreadable %s: ignored and removed", path)
        path.unlink(missing_ok=True)
        return 0
    if driver.get("pid") == os.getpid() or (driver.get("start") is not None and _alive(driver["pid"], driver["start"])):
        return 0  # the runtime of a live process (this one, holding the folder again): not a leftover
    targets = _runtime_processes(mark, recorded)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    left = set(targets)
    while left := {pid for pid in left if _alive(pid, targets[pid])}:
        if time.monotonic() > deadline:
            log.warning("%d leftover Ray process(es) of the run that held this state folder before still run %g s "
                        "after SIGKILL: %s (the record %s is kept)", len(left), timeout, sorted(left), path)
            return len(targets) - len(left)
        time.sleep(0.05)
    if targets:
        log.warning("stopped %d leftover Ray processes of the run that held this state folder before (pids %s)",
                    len(targets), ", ".join(map(str, sorted(targets))))
    path.unlink(missing_ok=True)
    return len(targets)
