"""The ``load_source`` task: read one data source (``gram_core.sources``) and publish it to the artifact store.

Its cache key includes the size and modification time of local files, so an edited file is read again while an
unchanged one costs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy

from data_contracts import DroppedRow, get_contract
from gram_core.sources import DROPPED_ROWS, SourceConfig, dropped_summary, read_source
from tasks.redaction import redact, scrub_errors
from tasks.retries import HUB_RETRIES
from tasks.settings import StatePaths
from tasks.store.artifacts import ArtifactRef, open_store, write_table_artifact
from tasks.store.caching import STAGE_CACHE_POLICY, stage_logger


def source_fingerprint(source: SourceConfig | None) -> str | None:
    """(path, size, mtime) of every local file of a source; None for starter/hub sources."""
    if source is None or source.hub or source.is_starter:
        return None
    path = Path(str(source.path)).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat() if file.exists() else None
        digest.update(f"{file.resolve()}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}\n".encode())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class SourceFiles(CachePolicy):
    """Cache-key component: the fingerprint of the local files behind the ``source`` input."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        return source_fingerprint(inputs.get("source"))


@task(name="load_source", cache_policy=STAGE_CACHE_POLICY + SourceFiles(), persist_result=True, **HUB_RETRIES)
@scrub_errors
def load_source(role: str, source: SourceConfig, contract: str, state: StatePaths, limit: int = 0, seed: int = 0,
                stratify: str | None = None, whole: tuple[str, ...] = ()) -> ArtifactRef:
    """Read, validate and publish one data source (``role``: prompts, pool, preferences, eval). With
    ``source.drop_invalid_rows`` the meta holds ``dropped_rows`` (``dropped_summary``)."""
    log = stage_logger()
    dropped: list[DroppedRow] = []
    table = read_source(source, contract, limit=limit, seed=seed, stratify=stratify, whole=whole, dropped=dropped)
    if table.num_rows == 0:
        raise ValueError(f"{role} source {source.describe()}: no rows (after limits)")
    meta: dict[str, Any] = {"role": role, "source": redact(source.describe())}
    if source.drop_invalid_rows:
        meta[DROPPED_ROWS] = dropped_summary(dropped)
    ref = write_table_artifact(open_store(state), "sources", table, get_contract(contract), meta=meta)
    log.info("%s: %d rows from %s%s -> %s", role, ref.rows, source.describe(),
             f" ({len(dropped)} invalid row(s) dropped)" if source.drop_invalid_rows else "", ref.uri)
    return ref

