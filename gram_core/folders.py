"""The one atomic folder writer: build a folder beside its target, then move it into place with one rename,
so a reader sees the old folder or the new one, never half of one; and its one-file twin for small JSON
records (``write_json``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_folder(target: str | Path, write: Callable[[Path], Any], *, keep_existing: str | None = None) -> Path:
    """``write(tmp)`` into a fresh folder next to ``target``, then ``move_folder`` it to ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        move_folder(tmp, target, keep_existing=keep_existing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_json(target: str | Path, data: Any) -> None:
    """``data`` as JSON in ``target``, atomically: a uniquely named file beside it (so concurrent writers never
    share one), fsynced, then renamed over ``target``."""
    target = Path(target)
    fd, staged = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, target)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    _fsync(target.parent)  # the rename itself is durable


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: str | Path) -> None:
    """fsync every file and folder under ``folder`` (itself included): after a crash the renamed folder holds
    what was written, not empty or truncated files."""
    folder = Path(folder)
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(Path(root) / name)
        _fsync(Path(root))


def move_folder(src: str | Path, dst: str | Path, *, keep_existing: str | None = None) -> None:
    """Rename ``src`` to ``dst`` (atomic on one filesystem).

    By default an existing ``dst`` is replaced (a non-empty one is moved aside and removed first; an empty one,
    e.g. a staging folder, is replaced by the rename itself). With ``keep_existing`` (the name of the file that
    marks a complete folder) a ``dst`` that another writer completed first is kept, and ``src`` is left for the
    caller to remove: identical content raced to the same place.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sync_folder(src)  # the data is on disk before the rename makes it visible
    if keep_existing is not None:
        try:
            os.rename(src, dst)
        except OSError:
            if not (dst / keep_existing).exists():
                raise
        _fsync(dst.parent)
        return
    if dst.exists() and any(dst.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / "x")
        shutil.rmtree(old)
    os.replace(src, dst)
    _fsync(dst.parent)  # the rename itself is durable
