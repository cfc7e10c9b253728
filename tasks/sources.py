"""Data sources -> validated, content-addressed tables: the first boundary every pipeline input crosses.

A ``SourceConfig`` names the built-in starter set, a local file/folder (Parquet, JSONL, JSON, CSV) or a
hub dataset. ``read_source`` reads it through ``data_contracts`` (column mapping, validation with errors
naming file, column and row), fills the two bookkeeping columns a user file may lack (the id column and
``source``), flattens chat-message columns when asked, and applies the seeded row limit. The ``load_source``
task publishes the result to the artifact store. Its cache key includes the size and modification time of
local files, so an edited file is read again while an unchanged one costs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.cache_policies import CachePolicy

from data_contracts import Contract, ContractError, DatasetNotCachedError, get_contract, read_table
from gram_core.pipeline_config import SourceConfig
from tasks.artifacts import ArtifactRef, ArtifactStore, write_table_artifact
from tasks.caching import STAGE_CACHE_POLICY, stage_logger
from tasks.retries import HUB_RETRIES

# Prompts for sampling have no table contract of their own in data_contracts; this one lives here.
PROMPTS = Contract(name="prompts", version=1,
                   schema=pa.schema([pa.field("prompt_id", pa.string(), nullable=False),
                                     pa.field("prompt", pa.string(), nullable=False)]),
                   id_column="prompt_id", non_empty=("prompt_id", "prompt"))
# Columns that hold a response (chat-message lists are flattened into these).
RESPONSE_COLUMNS = ("response", "response_a", "response_b", "chosen", "rejected")
# Columns a user file may leave out; they are filled in (row ids, the source's name).
FILLABLE = ("pair_id", "prompt_id", "source")


def contract_for(name: str) -> Contract:
    return PROMPTS if name == PROMPTS.name else get_contract(name)


def source_label(source: SourceConfig) -> str:
    """A short name for a source, used to fill the ``source`` column and in ids."""
    if source.hub:
        return source.hub.split("/")[-1]
    return "starter" if source.is_starter else Path(str(source.path)).stem


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _starter_table(contract: Contract) -> pa.Table:
    from gram_core import starter

    builders = {"prompts": starter.starter_prompts, "response_pool": starter.starter_response_pool,
                "preference_pairs": starter.starter_preferences, "rewardbench": starter.starter_eval}
    if contract.name not in builders:
        raise ValueError(f"the starter dataset has no {contract.name!r} table (it has {sorted(builders)})")
    table = builders[contract.name]()
    return pa.table({"prompt": pa.array(table, pa.string())}) if isinstance(table, list) else table


def _relaxed(contract: Contract, drop: set[str]) -> Contract:
    """The contract without the columns in ``drop`` (read what the file has, fill the rest)."""
    keep = [f for f in contract.schema if f.name not in drop]
    return Contract(name=contract.name, version=contract.version, schema=pa.schema(keep),
                    id_column=None if contract.id_column in drop else contract.id_column,
                    non_empty=tuple(c for c in contract.non_empty if c not in drop),
                    checks=tuple(c for c in contract.checks if c.column not in drop))


def _missing_fillable(err: ContractError) -> set[str] | None:
    """The fillable columns an error reports missing, when that is all that is wrong."""
    missing = {v.column for v in err.violations if v.problem == "missing column"}
    if missing and all(v.problem == "missing column" for v in err.violations) and missing <= set(FILLABLE):
        return missing
    return None


def _fill(table: pa.Table, contract: Contract, missing: set[str], label: str) -> pa.Table:
    """Add the missing bookkeeping columns: ``source`` = the source's name, ids from content or row."""
    n = table.num_rows
    if "source" in missing:
        table = table.append_column("source", pa.array([label] * n, pa.string()))
    if "prompt_id" in missing:
        from gram_core.sampling import prompt_id

        if contract.name == PROMPTS.name:  # the same prompt twice is one prompt: keep the first
            first: dict[str, int] = {}
            for index, prompt in enumerate(table["prompt"].to_pylist()):
                first.setdefault(prompt, index)
            table = table.take(sorted(first.values()))
        table = table.append_column("prompt_id", pa.array([prompt_id(p) for p in table["prompt"].to_pylist()]))
    if "pair_id" in missing:
        table = table.append_column("pair_id", pa.array([f"{label}-{i:06d}" for i in range(table.num_rows)]))
    return table


def _message_text(messages: Any) -> tuple[str, str]:
    """(prompt, response) from a chat message list: the last turn is the response (role assistant).
    Raises ValueError saying what is wrong (never turns a missing or non-text content into text)."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"expected a list of chat messages {{role, content}}, got {str(messages)[:60]!r}")
    for index, message in enumerate(messages):
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {index} has content {message.get('content')!r:.40}; expected text")
    if messages[-1].get("role") != "assistant":
        raise ValueError(f"the last message has role {messages[-1].get('role')!r}; expected 'assistant'")
    turns = messages[:-1]
    if len(turns) == 1 and turns[0].get("role") == "user":
        prompt = turns[0]["content"]
    else:  # multi-turn context: keep every turn, labeled, in order
        prompt = "\n\n".join(f"{str(m.get('role', '')).capitalize()}: {m['content']}" for m in turns)
    return prompt, messages[-1]["content"]


def flatten_conversations(table: pa.Table, contract: Contract, column_map: dict[str, str], where: str) -> pa.Table:
    """Replace chat-message list columns that feed response columns by text; derive ``prompt`` from them.
    Rows that are not well-formed conversations are one ContractError naming the column and rows."""
    from data_contracts import Violation

    targets = {src: column_map.get(src, src) for src in table.column_names}
    convo = [src for src, dst in targets.items() if dst in RESPONSE_COLUMNS and contract.schema.get_field_index(dst) >= 0
             and pa.types.is_list(table.schema.field(src).type)]
    if not convo:
        raise ValueError(f"{where}: conversations=true but no response column holds message lists "
                         f"(columns {table.column_names}, column_map {column_map})")
    prompts: list[str] | None = None
    violations = []
    for src in convo:
        pairs, bad = [], []
        for i, messages in enumerate(table[src].to_pylist()):
            try:
                pairs.append(_message_text(messages))
            except ValueError as err:
                bad.append((i, str(err)))
                pairs.append(("", ""))
        if bad:
            violations.append(Violation(src, "not a well-formed conversation", "a list of {role, content} "
                                        "messages with text content, the last one from the assistant", len(bad),
                                        tuple(i for i, _ in bad[:5]), tuple(m for _, m in bad[:5])))
            continue
        table = table.set_column(table.column_names.index(src), src, pa.array([r for _, r in pairs], pa.string()))
        prompts = prompts or [p for p, _ in pairs]
    if violations:
        raise ContractError(where, contract, violations)
    has_prompt = any(dst == "prompt" for dst in targets.values())
    if not has_prompt and prompts is not None:
        table = table.append_column("prompt", pa.array(prompts, pa.string()))
    return table


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _load_raw_dataset(source: SourceConfig) -> pa.Table:
    """A whole split as an Arrow table through `datasets` (hub ids, or local files for conversations)."""
    import datasets

    if source.hub:
        args: tuple = (source.hub, source.name)
        kwargs: dict[str, Any] = {"split": source.split}
    else:
        path = Path(str(source.path)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        files = sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() else [str(path)]
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}[Path(files[0]).suffix]
        args, kwargs = (kind,), {"data_files": files, "split": "train"}
    try:
        loaded = datasets.load_dataset(*args, **kwargs)
    except Exception as exc:
        if source.hub and (_offline() or isinstance(exc, ConnectionError)):
            raise DatasetNotCachedError(
                f"hub dataset {source.describe()} is not in the local datasets cache and the hub cannot be "
                f"reached ({type(exc).__name__}: {exc}); download it on a connected machine or point the "
                "source at a local file (path: ...)") from exc
        raise
    return loaded.with_format("arrow")[:]


def _read(source: SourceConfig, contract: Contract) -> pa.Table:
    name = f"hub:{source.hub}" if source.hub else str(source.path)
    if source.is_starter:
        return read_table(_starter_table(contract), contract, source_name=f"starter:{contract.name}")
    if source.conversations or source.hub:
        raw = _load_raw_dataset(source)
        if source.conversations:
            raw = flatten_conversations(raw, contract, dict(source.column_map), name)
        return read_table(raw, contract, column_map=dict(source.column_map), source_name=name)
    return read_table(Path(str(source.path)).expanduser(), contract, column_map=dict(source.column_map))


def limit_rows(table: pa.Table, limit: int, seed: int, stratify: str | None = None,
               whole: Collection[str] = ()) -> pa.Table:
    """At most ``limit`` rows, a seeded sample in the original order; ``stratify`` keeps every group's share
    (each group gets at least one row when the limit allows). Groups named in ``whole`` are kept in full
    and not counted against ``limit``."""
    import numpy as np

    if not limit or table.num_rows <= limit:
        return table
    rng = np.random.default_rng(seed)
    if stratify is None:
        return table.take(np.sort(rng.choice(table.num_rows, size=limit, replace=False)))
    groups: dict[str, list[int]] = {}
    kept: list[int] = []
    for index, key in enumerate(table[stratify].to_pylist()):
        (kept if key in whole else groups.setdefault(key, [])).append(index)
    if not groups:
        return table
    quota = _quotas({k: len(v) for k, v in groups.items()}, limit)
    picked = [i for key in sorted(groups) for i in rng.choice(groups[key], size=quota[key], replace=False)]
    return table.take(np.sort(np.asarray(picked + kept, dtype=np.int64)))


def _quotas(sizes: dict[str, int], limit: int) -> dict[str, int]:
    """Rows per group: proportional to its size (largest remainder), at least one per group."""
    total = sum(sizes.values())
    exact = {k: limit * s / total for k, s in sizes.items()}
    quota = {k: min(sizes[k], max(1, int(e))) for k, e in exact.items()}
    for key in sorted(sizes, key=lambda k: (int(exact[k]) - exact[k], k)):
        if sum(quota.values()) >= limit:
            break
        quota[key] = min(sizes[key], quota[key] + 1)
    return quota


def read_source(source: SourceConfig, contract: str | Contract, *, limit: int = 0, seed: int = 0,
                stratify: str | None = None, whole: Collection[str] = ()) -> pa.Table:
    """Read and validate one source; fill missing id/source columns; apply source.limit, then ``limit``
    (``whole``: ``stratify`` groups kept in full, see ``limit_rows``)."""
    contract = contract_for(contract) if isinstance(contract, str) else contract
    try:
        table = _read(source, contract)
    except ContractError as err:
        missing = _missing_fillable(err)
        if missing is None:
            raise
        table = _fill(_read(source, _relaxed(contract, missing)), contract, missing, source_label(source))
        table = read_table(table, contract, source_name=err.source)
    table = limit_rows(table, source.limit, source.seed)
    return limit_rows(table, limit, seed, stratify, whole)


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


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
def load_source(role: str, source: SourceConfig, contract: str, store_uri: str, limit: int = 0, seed: int = 0,
                stratify: str | None = None, whole: tuple[str, ...] = ()) -> ArtifactRef:
    """Read, validate and publish one data source (``role``: prompts, pool, preferences, eval)."""
    log = stage_logger()
    table = read_source(source, contract, limit=limit, seed=seed, stratify=stratify, whole=whole)
    if table.num_rows == 0:
        raise ValueError(f"{role} source {source.describe()}: no rows (after limits)")
    ref = write_table_artifact(ArtifactStore(store_uri), "sources", table, contract_for(contract),
                               meta={"role": role, "source": source.describe()})
    log.info("%s: %d rows from %s -> %s", role, ref.rows, source.describe(), ref.uri)
    return ref
