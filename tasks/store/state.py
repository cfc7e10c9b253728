"""The state folder (GRAM_HOME): one run at a time, leftovers of killed runs removed at the start, and gc.

``hold_state_folder`` takes an exclusive lock on ``<home>/.gram.lock`` for the whole run; a second run on the
same folder fails at once with "another run holds this state folder" (who, since when). The kernel drops
the lock when its process dies, ``kill -9`` included. Holding it, nothing else writes the folder, so the
leftovers of killed runs are safe to remove: first the Ray processes that a killed run's local runtime left
running (``tasks.store.leftover_processes``; they could still write checkpoints), then staging folders of unfinished
artifacts, partial downloads, and the workers' local checkpoint scratch. ``collect_garbage`` (``gram gc``) stops
those Ray processes too, then goes further: artifacts no cached stage refers to, cache entries, and Ray
checkpoints that Ray Train's run snapshot does not list.

An artifact store or Ray storage folder may be shared by several state folders. Each one that uses it holds a
lock file ``<root>/.gram-users/<hash of home>.lock`` for its run (the home's path beside it, ``.home``), so
start-up cleanup skips a shared root's staging and scratch folders while another state folder's run is
live, and gc keeps every artifact that any registered state folder's cached results refer to, read from their
JSON records (``tasks.store.ref_records``; gc never unpickles anything). gc also keeps what another state folder's live
run may still commit: artifacts published since that run started, and its Ray runs (a Ray run's name ends with
its state folder's ``home_id``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from tasks.settings import PipelineConfig, StatePaths, state_paths
from tasks.store.artifacts import MANIFEST, open_store
from tasks.store.leftover_processes import stop_leftovers
from tasks.store.locks import LockHeldError, file_lock
from tasks.store.ref_records import read_records

LOCK_FILE = ".gram.lock"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's committed checkpoints
SCRATCH = ".scratch"  # workers' local checkpoint folders, under the Ray storage folder
STAGING_PREFIXES = (".staging-", ".tmp-", ".dl-")


class StateFolderBusy(LockHeldError):
    """Another run holds the state folder."""


@contextlib.contextmanager
def hold_state_folder(config: PipelineConfig, clean: bool = True) -> Iterator[StatePaths]:
    """Hold ``config``'s state folder for this process (re-entrant) and (``clean``) remove the leftovers of
    killed runs.

    Yields the folder's ``StatePaths``; the tasks and Ray workers get them (or the paths they need) as
    arguments, so nothing reads the state folder from the environment.
    """
    paths = state_paths(config)
    paths.home.mkdir(parents=True, exist_ok=True)
    if paths.home.stat().st_uid == os.getuid():
        os.chmod(paths.home, 0o700)  # Prefect's results under it are pickles that Prefect loads
    lock = paths.home / LOCK_FILE
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(lock, f"gram run on {paths.home}", wait=False))
        except LockHeldError as err:
            raise StateFolderBusy(f"another run holds this state folder ({paths.home}): {err}. Wait for it to "
                                  "finish, or give this run its own folder (GRAM_HOME=... or --set home=...)") from None
        stop_leftovers(paths.home)  # before any file is judged a leftover; for gc (clean=False) too
        with contextlib.ExitStack() as registering:  # no other state folder registers while this one cleans
            for root in shared_roots(paths):
                registering.enter_context(file_lock(root / USERS / ".register.lock", f"registering {paths.home}"))
                stack.enter_context(file_lock(_user_lock(root, paths.home), f"state folder {paths.home}",
                                              wait=False))
            removed = clean_leftovers(paths) if clean else []
        if removed:
            import logging

            logging.getLogger("gram").info("removed %d leftover(s) of interrupted runs: %s", len(removed),
                                           ", ".join(removed[:5]))
        yield paths


USERS = ".gram-users"  # in a shared root: one lock file per state folder that uses it


def shared_roots(paths: StatePaths) -> list[Path]:
    """The local folders this state folder may share with others: the artifact store and the Ray storage."""
    store = open_store(paths)
    roots = [Path(store.uri)] if store.local else []
    ray = _local(paths.ray_storage)
    if ray is not None:
        roots.append(ray.expanduser().resolve())
    return list(dict.fromkeys(roots))


def home_id(home: str | Path) -> str:
    """A state folder's identity in shared roots: its user lock's name, and the suffix of its Ray run names."""
    return hashlib.sha256(str(Path(home).expanduser().resolve()).encode()).hexdigest()[:16]


def run_owner(run_name: str) -> str | None:
    """The ``home_id`` a Ray run name ends with (``tasks.train_stage.run_name``), or None for an older name."""
    parts = run_name.rsplit("-", 2)
    owner = parts[-1]
    if len(parts) == 3 and len(owner) == 16 and all(c in "0123456789abcdef" for c in owner):
        return owner
    return None


def _user_lock(root: Path, home: Path) -> Path:
    """This state folder's lock file in a shared root (created with its home's path beside it)."""
    home = Path(home).resolve()
    users = root / USERS
    users.mkdir(parents=True, exist_ok=True)
    name = home_id(home)
    (users / f"{name}.home").write_text(str(home))
    return users / f"{name}.lock"


def _held(lock: Path) -> bool:
    """Whether a live process holds ``lock`` (a flock taken by another open of the file, in any process)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken just now
    return False


def other_users(root: Path, home: Path) -> list[Path]:
    """Homes of the other state folders registered in ``root`` (live or not)."""
    mine = Path(home).resolve()
    homes = []
    for entry in sorted((root / USERS).glob("*.home")):
        try:
            other = Path(entry.read_text().strip())
        except OSError:
            continue
        if other != mine:
            homes.append(other)
    return homes


def live_holders(root: Path, home: Path) -> dict[str, float]:
    """The other state folders whose run holds ``root`` now: ``home_id`` -> when it took its lock (the lock
    file's mtime: ``file_lock`` rewrites it on every acquisition)."""
    mine = home_id(home)
    found = {}
    for lock in sorted((root / USERS).glob("*.lock")) if (root / USERS).is_dir() else ():
        if lock.stem != mine and not lock.name.startswith(".") and _held(lock):
            with contextlib.suppress(OSError):
                found[lock.stem] = lock.stat().st_mtime
    return found


def _live_elsewhere(root: Path, home: Path) -> bool:
    _user_lock(root, home)
    return bool(live_holders(root, home))


def _leftovers(paths: StatePaths) -> list[Path]:
    """Leftovers of killed runs; in a shared root only while no other state folder's run is live there."""
    found: list[Path] = []
    store = open_store(paths)
    if store.local and Path(store.uri).is_dir() and not _live_elsewhere(Path(store.uri), paths.home):
        found += [p for stage in Path(store.uri).iterdir() if stage.is_dir() and stage.name != USERS
                  for p in stage.iterdir() if p.name.startswith(STAGING_PREFIXES)]
    cache = paths.artifact_cache
    if cache.is_dir():
        found += [p for p in cache.iterdir() if p.name.startswith(STAGING_PREFIXES) or p.name == "staging"]
    scratch = _local(paths.ray_storage)
    if scratch is not None and (scratch / SCRATCH).is_dir() and not _live_elsewhere(scratch.expanduser().resolve(),
                                                                                      paths.home):
        found += list((scratch / SCRATCH).iterdir())
    return found


def clean_leftovers(paths: StatePaths) -> list[str]:
    """Remove staging folders, partial downloads and checkpoint scratch of interrupted runs (call only while
    holding the state folder). Returns what was removed."""
    removed = []
    for path in _leftovers(paths):
        _remove(path)
        removed.append(str(path))
    return removed


def _local(path: str) -> Path | None:
    return None if "://" in path else Path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# gc
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Garbage:
    path: str
    bytes: int
    why: str


def cached_refs(results_dir: Path) -> tuple[list[tuple[str, str]], list[Path]]:
    """(uri, sha256) of the artifacts the cached results in ``results_dir`` refer to, and the result files
    without a readable JSON record (``tasks.store.ref_records``): read as JSON only, never unpickled."""
    return read_records(results_dir)


def _registered_cache_garbage(cache: Path) -> list[Garbage]:
    """In the registered-model cache (``registry.registered_model_dir``): interrupted downloads, and model
    folders no cached version points at any more."""
    if not cache.is_dir():
        return []
    index = cache / "by-version"
    used = set()
    for entry in index.glob("*/*.json") if index.is_dir() else ():
        try:
            used.add(json.loads(entry.read_text())["folder"])
        except (OSError, ValueError, KeyError):
            return []  # an unreadable index entry: keep everything
    found = []
    for path in sorted(cache.iterdir()):
        if path.name.startswith(".download-"):
            found.append(Garbage(str(path), _size(path), "leftover of an interrupted model download"))
        elif path.is_dir() and path.name != "by-version" and path.name not in used:
            found.append(Garbage(str(path), _size(path), "registered-model copy no cached version points at"))
    return found


LIVE_SLACK_S = 2.0  # file times vs. the lock's time: coarse clocks, a publish that began just before


def find_garbage(config: PipelineConfig, keep_ray_runs_days: float = 7.0) -> list[Garbage]:
    """What ``gram gc`` would remove, and why. Nothing is unpickled: what is live comes from the JSON records
    of cached results (``tasks.store.ref_records``), this state folder's and every other registered one's. What a
    live run of another state folder may still commit stays: artifacts published since it started (not yet in
    a record) and its Ray runs (checkpoints not yet in their snapshot)."""
    paths = state_paths(config)
    garbage = [Garbage(str(p), _size(p), "leftover of an interrupted run") for p in _leftovers(paths)]
    refs, unreadable = cached_refs(paths.prefect_results)
    store = open_store(paths)
    live_since = None
    if store.local:  # what the other state folders sharing this store still use
        root = Path(store.uri)
        for other in other_users(root, paths.home):
            other_refs, other_unreadable = cached_refs(other / "prefect-results")
            refs += other_refs
            unreadable += other_unreadable
        started = live_holders(root, paths.home).values()
        live_since = min(started) - LIVE_SLACK_S if started else None
    keep_uris = {uri.rstrip("/") for uri, _ in refs}
    keep_sha = {sha for _, sha in refs}
    if not unreadable and store.local:  # without every cached result read, any artifact might still be needed
        for ref in store.list():
            if ref.uri.rstrip("/") in keep_uris:
                continue
            if live_since is not None and _mtime(Path(ref.uri) / MANIFEST) >= live_since:
                continue  # published during another state folder's live run: its record may not exist yet
            garbage.append(Garbage(ref.uri, _size(Path(ref.uri)), f"{ref.kind} artifact no cached stage uses"))
    cache = paths.artifact_cache
    if cache.is_dir():
        garbage += [Garbage(str(p), _size(p), "downloaded copy of an artifact no cached stage uses")
                    for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "staging"
                    and p.name not in keep_sha]
    garbage += _registered_cache_garbage(Path(str(paths.home)) / "registered")
    garbage += _ray_garbage(paths, keep_ray_runs_days)
    for path in unreadable:
        garbage.append(Garbage(str(path), 0, "KEPT: cached result without a readable JSON record, so no artifact "
                                             "is pruned (a `gram run` of its config records it again)"))
    return garbage


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("inf")  # vanished or unreadable: treat as new, keep


def _ray_garbage(paths: StatePaths, keep_ray_runs_days: float) -> list[Garbage]:
    """Ray runs older than the cut-off, and checkpoints their run's snapshot does not list; never a run of
    another state folder whose run is live (a checkpoint it wrote may not be in its snapshot yet)."""
    ray_root = _local(paths.ray_storage)
    if ray_root is None or not ray_root.is_dir():
        return []
    ray_root = ray_root.expanduser().resolve()
    live = live_holders(ray_root, paths.home)
    cutoff = time.time() - keep_ray_runs_days * 86400
    garbage = []
    for run in sorted(p for p in ray_root.iterdir() if p.is_dir() and p.name not in (SCRATCH, USERS)):
        owner = run_owner(run.name)
        if owner in live or (owner is None and live):
            continue  # another state folder's live run (an older name without its owner: any live one's)
        if run.stat().st_mtime < cutoff:
            garbage.append(Garbage(str(run), _size(run), f"interrupted Ray run older than {keep_ray_runs_days:g} days"))
            continue
        committed = committed_checkpoints(run)
        if committed is None:  # no readable snapshot: a resume may need any of them
            continue
        garbage += [Garbage(str(c), _size(c), "Ray checkpoint not in its run's snapshot (superseded or torn)")
                    for c in sorted(run.glob("checkpoint-*")) if c.is_dir() and c.name not in committed]
    return garbage


def committed_checkpoints(run: Path) -> set[str] | None:
    """The checkpoint folder names Ray Train's run snapshot lists (what a resume restores from: the kept
    results, the latest, those awaiting validation), or None when there is no readable snapshot. A folder
    that is not listed was superseded, or written but never committed (torn by a kill)."""
    try:
        state = json.loads((run / RAY_SNAPSHOT).read_text())
    except (OSError, ValueError):
        return None
    results = [*state.get("checkpoint_results", []), state.get("latest_checkpoint_result") or {},
               *state.get("pending_training_results", [])]
    return {r["checkpoint_dir_name"] for r in results if isinstance(r, dict) and r.get("checkpoint_dir_name")}


def collect_garbage(config: PipelineConfig, apply: bool = False, keep_ray_runs_days: float = 7.0) -> list[Garbage]:
    """Find (and with ``apply``, remove) garbage while holding the state folder; returns the list."""
    registered = Path(str(state_paths(config).home)) / "registered"
    with hold_state_folder(config, clean=False), \
            file_lock(registered / ".cache.lock", "registered-model cache (gc)", owner_thread=True):
        garbage = find_garbage(config, keep_ray_runs_days)  # no `gram judge` download runs meanwhile
        if apply:
            store = open_store(state_paths(config))
            for item in garbage:
                if item.why.startswith("KEPT"):
                    continue
                path = Path(item.path)
                if (path / MANIFEST).exists():  # an artifact: drop the manifest first, so it is never half there
                    (path / MANIFEST).unlink()
                if path.exists():
                    _remove(path)
                elif not store.local and store.fs.exists(item.path):
                    store.fs.rm(item.path, recursive=True)
    return garbage
