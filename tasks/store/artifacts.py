"""The content-addressed artifact store: every stage output lives in ``<store>/<stage>/<hash>/``.

A stage builds its output in a private staging folder, the folder's content is hashed, and only then is it
moved into place under its hash (one rename on a local disk; through fsspec elsewhere, the data files are
uploaded first and the manifest last, so a reader never sees a half-uploaded artifact as complete). A
failing stage therefore leaves nothing behind, and identical content lands in the same place. Remote
artifacts are downloaded into ``<home>/artifact-cache/<sha256>`` (``open_store(state)``) and their hash is
checked before use. Stages pass ``ArtifactRef`` values (URI, hash, contract, rows) instead of tables, so
Prefect results stay tiny.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

from gram_core.artifact_files import MANIFEST, TABLE_FILE, TIMINGS_FILE, TRAIN_HISTORY_FILE, UNHASHED
from gram_core.folders import move_folder
from tasks.settings import StatePaths

HASH_CHARS = 16  # folder name length: 64 bits of SHA-256 are plenty to tell outputs apart


class ArtifactError(RuntimeError):
    """An artifact is missing or unreadable; the message names its URI and what to do."""


def artifact_cache_dir(home: str | Path | None = None) -> Path:
    """Where remote artifacts are downloaded: ``<home>/artifact-cache`` (home: GRAM_HOME, else ./.gram)."""
    home = home or os.environ.get("GRAM_HOME") or ".gram"
    return Path(home).expanduser().resolve() / "artifact-cache"


def open_store(state: StatePaths) -> ArtifactStore:
    """The artifact store of a state folder, downloading remote artifacts into its own cache."""
    return ArtifactStore(state.artifact_store, cache_dir=state.artifact_cache)


@dataclasses.dataclass(frozen=True)
class ArtifactRef:
    """A small, picklable reference to one stage output (what Prefect caches and flows pass around)."""

    uri: str  # folder URI (a local absolute path for the default store)
    sha256: str  # content hash of the folder: relative paths and bytes of every file but the manifest
    kind: str  # "table", "model", "scores" or "report"
    contract: str | None = None  # data contract of TABLE_FILE, for table-like artifacts
    rows: int | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # small extras: metrics, stats, counts

    @property
    def short(self) -> str:
        return self.sha256[:HASH_CHARS]

    def file(self, name: str) -> str:
        """URI of a file inside the artifact folder."""
        return f"{self.uri.rstrip('/')}/{name}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtifactRef:
        return cls(**data)


def folder_sha256(folder: str | Path) -> str:
    """SHA-256 over (relative path, size, bytes) of every file in ``folder`` but the manifest and the
    wall-clock timings (``UNHASHED``), in sorted path order."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in UNHASHED)
    for path in files:
        rel = path.relative_to(folder).as_posix()
        digest.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# The training history: written here, read here (a Ray Train final checkpoint holds the raw rows; a model
# artifact holds them with the wall-clock figures split out).


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_history_rows(folder: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` (one per step) as they are, as ``folder``'s TRAIN_HISTORY_FILE (a Ray Train final checkpoint)."""
    _write_jsonl(Path(folder) / TRAIN_HISTORY_FILE, rows)


def read_history_rows(folder: Path) -> list[dict[str, Any]]:
    """``folder``'s TRAIN_HISTORY_FILE rows as written (none when the file is absent)."""
    return _read_jsonl(Path(folder) / TRAIN_HISTORY_FILE)


def write_train_history(folder: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` (one per step) as a model artifact's TRAIN_HISTORY_FILE, their wall-clock figures split out into
    TIMINGS_FILE."""
    from gram_core.training import WALL_CLOCK_METRICS

    history = [{k: v for k, v in r.items() if k not in WALL_CLOCK_METRICS} for r in rows]
    timings = [{"step": r.get("step"), **{k: v for k, v in r.items() if k in WALL_CLOCK_METRICS}} for r in rows]
    _write_jsonl(Path(folder) / TRAIN_HISTORY_FILE, history)
    _write_jsonl(Path(folder) / TIMINGS_FILE, timings)


def read_history(folder: Path) -> list[dict[str, Any]]:
    """A model artifact's per-step training metrics (numbers only), from its TRAIN_HISTORY_FILE and the
    wall-clock figures beside it (TIMINGS_FILE, when there); none when it has no history."""
    rows = read_history_rows(folder)
    by_step = {t["step"]: t for t in _read_jsonl(Path(folder) / TIMINGS_FILE) if "step" in t}
    rows = [{**by_step.get(r.get("step"), {}), **r} for r in rows]
    return [{k: v for k, v in r.items() if k == "step" or isinstance(v, (int, float))} for r in rows if "step" in r]


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _strip_file_scheme(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


class ArtifactStore:
    """A folder of stage outputs addressed by content; local by default, any fsspec URI otherwise."""

    def __init__(self, uri: str | Path, cache_dir: str | Path | None = None):
        uri = str(uri)
        self.local = _is_local(uri)
        self.uri = str(Path(_strip_file_scheme(uri)).expanduser().resolve()) if self.local else uri.rstrip("/")
        self.fs, _ = fsspec.core.url_to_fs(self.uri)
        # Remote artifacts are downloaded here (keyed by hash, checked before use) when a stage needs local files.
        self.cache_dir = Path(cache_dir) if cache_dir else artifact_cache_dir()

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    def _join(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    @contextlib.contextmanager
    def staging(self, stage: str) -> Iterator[Path]:
        """A fresh local folder to build an output in; removed afterwards, whether publish ran or not."""
        parent = Path(self._join(stage)) if self.local else self.cache_dir / "staging"
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, stage: str, folder: str | Path, kind: str, *, contract: str | None = None,
                rows: int | None = None, meta: dict[str, Any] | None = None) -> ArtifactRef:
        """Move a finished staging folder to ``<store>/<stage>/<hash>/`` and return its reference."""
        folder = Path(folder)
        sha = folder_sha256(folder)
        ref = ArtifactRef(uri=self._join(stage, sha[:HASH_CHARS]), sha256=sha, kind=kind, contract=contract,
                          rows=rows, meta=dict(meta or {}))
        (folder / MANIFEST).write_text(json.dumps(ref.to_dict(), indent=1, sort_keys=True, default=str))
        if self.exists(ref):  # identical content is already in place (e.g. a refreshed, deterministic stage)
            if self.local:  # published again now: gc keeps it like a fresh one until a record names it
                with contextlib.suppress(OSError):
                    os.utime(ref.file(MANIFEST))
            return ref
        if self.local:
            _move_local(folder, Path(ref.uri))
        else:  # data first, manifest last: until the manifest lands, the folder is not an artifact
            for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
                self.fs.put_file(str(path), ref.file(path.relative_to(folder).as_posix()))
            self.fs.put_file(str(folder / MANIFEST), ref.file(MANIFEST))
        return ref

    def exists(self, ref: ArtifactRef) -> bool:
        return self.fs.exists(ref.file(MANIFEST))

    def require(self, ref: ArtifactRef) -> ArtifactRef:
        """Fail clearly when a (cached) reference points at an artifact that was deleted."""
        if not self.fs.exists(ref.file(MANIFEST)):
            raise ArtifactError(f"artifact {ref.uri} ({ref.kind}) is missing from the store; it was deleted "
                                "after the stage that wrote it was cached. Re-run with --refresh.")
        return ref

    def local_dir(self, ref: ArtifactRef) -> Path:
        """A local folder with the artifact's files (the folder itself, or a hash-keyed download whose content
        hash is checked before every use: a tampered or truncated copy is replaced, a bad download fails)."""
        self.require(ref)
        if self.local:
            return Path(ref.uri)
        target = self.cache_dir / ref.sha256
        if (target / MANIFEST).exists() and folder_sha256(target) == ref.sha256:
            return target
        shutil.rmtree(target, ignore_errors=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.cache_dir / f".dl-{uuid.uuid4().hex}"
        self.fs.get(ref.uri, str(tmp), recursive=True)
        got = folder_sha256(tmp)
        if got != ref.sha256:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ArtifactError(f"artifact {ref.uri}: downloaded content hashes to {got[:16]}, expected "
                                f"{ref.sha256[:16]}; the store copy is corrupt or was changed. Re-run with --refresh.")
        _move_local(tmp, target)
        return target

    def open(self, ref: ArtifactRef, name: str, mode: str = "rb"):
        return self.fs.open(self.require(ref).file(name), mode)

    def read_text(self, ref: ArtifactRef, name: str) -> str:
        with self.open(ref, name, "r") as handle:
            return handle.read()

    def list(self, stage: str | None = None) -> list[ArtifactRef]:
        """References of every complete artifact (of one stage), read from their manifests."""
        pattern = self._join(stage or "*", "*", MANIFEST)
        refs = []
        for path in sorted(self.fs.glob(pattern)):
            with self.fs.open(path, "r") as handle:
                refs.append(ArtifactRef.from_dict(json.load(handle)))
        return refs


def _move_local(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (atomic on one filesystem); if another writer won the race, keep theirs."""
    move_folder(src, dst, keep_existing=MANIFEST)
    shutil.rmtree(src, ignore_errors=True)  # left behind only when another writer's copy was kept


def write_table_artifact(store: ArtifactStore, stage: str, table: Any, contract: Any, *,
                         meta: dict[str, Any] | None = None,
                         extra_tables: dict[str, tuple[Any, Any]] | None = None) -> ArtifactRef:
    """Validate ``table`` against ``contract`` (a data_contracts Contract or name) and publish it as
    ``<store>/<stage>/<hash>/table.parquet``; ``extra_tables`` = {file name: (table, contract)} ride along
    (e.g. the response pool that pairs were built from)."""
    from data_contracts import get_contract, write_table

    contract = get_contract(contract)
    with store.staging(stage) as folder:
        write_table(table, folder / TABLE_FILE, contract)
        for name, (extra, extra_contract) in (extra_tables or {}).items():
            write_table(extra, folder / name, extra_contract)
        return store.publish(stage, folder, "table", contract=contract.name, rows=table.num_rows, meta=meta)


def read_table_artifact(store: ArtifactStore, ref: ArtifactRef, name: str = TABLE_FILE):
    """The Parquet table of a table artifact (a pyarrow.Table)."""
    import pyarrow.parquet as pq

    with store.open(ref, name) as handle:
        return pq.read_table(handle)
