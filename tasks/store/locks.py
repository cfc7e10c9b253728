"""Advisory file locks (``flock``): the promotion gate's lock and the state folder's lock.

The kernel releases a ``flock`` when its process dies, ``kill -9`` included, so a crashed run never leaves
a stale lock behind. Locks are re-entrant within one process (a flow that the CLI already locked may lock
the same folder again), and two threads or processes that open the same path exclude each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

_HELD: dict[tuple[str, int | None], int] = {}  # (path, thread or None) -> depth, for locks held here
_GUARD = threading.RLock()


class LockHeldError(RuntimeError):
    """Another process holds the lock; the message says who (pid, host, since) and what to do."""


def holder(path: Path) -> str:
    """Who holds (or last held) the lock at ``path``, as written by ``file_lock``."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown process"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('what')})"


@contextlib.contextmanager
def file_lock(path: str | Path, what: str, *, wait: bool = True, owner_thread: bool = False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    ``wait=False`` raises ``LockHeldError`` at once when another process holds it. A lock this process
    already holds is re-entered without blocking; with ``owner_thread`` only by the thread holding it, so
    threads of one process exclude each other too (the promotion gate).
    """
    path = Path(path)
    key = (str(path.absolute()), threading.get_ident() if owner_thread else None)
    with _GUARD:
        reentered = key in _HELD
        if reentered:
            _HELD[key] += 1
    if reentered:
        try:
            yield
        finally:
            with _GUARD:
                _HELD[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            raise LockHeldError(f"{what}: {path} is locked by {holder(path)}") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
        with _GUARD:
            _HELD[key] = 1
        try:
            yield
        finally:
            with _GUARD:
                _HELD.pop(key, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
