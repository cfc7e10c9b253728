"""Where a secret ended up: every file a test's processes wrote (databases, logs, Ray's session folder with Ray
Serve's replica and proxy logs, reports), read byte for byte."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def files_holding(root: str | Path, needles: Iterable[bytes], skip: Iterable[Path] = ()) -> list[str]:
    """The files under ``root`` whose bytes contain any of ``needles`` (symbolic links and ``skip``, such as the
    token file a server read its secret from, left out)."""
    needles, skip = tuple(needles), set(skip)
    return [str(p) for p in Path(root).rglob("*")
            if p.is_file() and not p.is_symlink() and p not in skip and any(n in p.read_bytes() for n in needles)]


def replica_logs(root: str | Path) -> list[str]:
    """The Ray Serve replica logs under ``root`` (a Ray temp folder), to show that a scan read them."""
    return [p.name for p in Path(root).rglob("replica_*.log")]
