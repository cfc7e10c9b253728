"""Data sources -> validated tables: the first boundary every pipeline input crosses (pure; no orchestration).

A ``SourceConfig`` names the built-in starter set, a local file/folder (Parquet, JSONL, JSON, CSV) or a
hub dataset. ``read_source`` reads it through ``data_contracts`` (column mapping, validation with errors
naming file, column and row; on request, rows that break a row-level rule dropped and logged), fills the two
bookkeeping columns a user file may lack (the id column and ``source``), flattens chat-message columns when
asked, and applies the seeded row limit (``limit_rows``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_contracts import (
    MAX_DROPPED_SHARE,
    PROMPTS,
    Contract,
    ContractError,
    DroppedRow,
    get_contract,
    load_hub_split,
    read_table,
)
from gram_core.config import check, field
from gram_core.conversations import flatten_conversations

STARTER = "starter"
# Columns a user file may leave out; they are filled in (row ids, the source's name).
FILLABLE = ("pair_id", "prompt_id", "source")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    path: str | None = field(None, "'starter' (the built-in starter dataset), or a local Parquet/JSONL/JSON/CSV "
                             "file or folder of such files.")
    hub: str | None = field(None, "Hugging Face hub dataset id (e.g. 'allenai/reward-bench'); read through "
                            "`datasets`, from its local cache when offline.")
    name: str | None = field(None, "Hub dataset configuration name (e.g. 'all').")
    split: str = field("train", "Dataset split (hub datasets; the starter set has 'train' and 'eval').")
    column_map: dict[str, str] = field({}, "Rename source columns to contract columns: {source: contract}.")
    conversations: bool = field(False, "Response columns hold chat message lists (role/content): the last "
                                "assistant turn is the response, the turns before it become the prompt.")
    limit: int = field(0, "Keep at most this many rows (seeded random sample, order kept); 0 = all.")
    seed: int = field(0, "Seed of the `limit` sample.")
    drop_invalid_rows: bool = field(False, "Drop the rows that break a row-level rule of the data contract (blank "
                                    "text, a null, chosen equal to rejected, text that is not valid Unicode, a value "
                                    "of the wrong JSON type, any value outside its domain), logging each once "
                                    "(file, row, id, rule), instead of stopping. Whole-file faults (a missing or "
                                    "mistyped column, repeated ids, an unreadable file) still stop the run. "
                                    "Formerly drop_blank_rows.")
    max_dropped_share: float = field(MAX_DROPPED_SHARE, "With drop_invalid_rows: the largest share of a file's "
                                     "rows that may be dropped (0.05 = 5 %); a file past it stops the run.")

    RENAMED = {"drop_blank_rows": "drop_invalid_rows"}  # the old key still works, with a FutureWarning

    def __post_init__(self) -> None:
        check((self.path is None) != (self.hub is None), "source",
              f"set exactly one of `path` or `hub` (got path={self.path!r}, hub={self.hub!r})")
        check(self.limit >= 0, "source.limit", f"must be >= 0, got {self.limit}")
        check(0 <= self.max_dropped_share <= 1, "source.max_dropped_share",
              f"must be a share in [0, 1], got {self.max_dropped_share}")

    @property
    def is_starter(self) -> bool:
        return self.path == STARTER

    def describe(self) -> str:
        """'hub:org/name/config[split]', 'starter' or the path, plus the row limit."""
        if self.hub:
            where = f"hub:{self.hub}" + (f"/{self.name}" if self.name else "") + f"[{self.split}]"
        else:
            where = str(self.path)
        return where + (f" (limit {self.limit})" if self.limit else "")


def source_label(source: SourceConfig) -> str:
    """A short name for a source, used to fill the ``source`` column and in ids."""
    if source.hub:
        return source.hub.split("/")[-1]
    return "starter" if source.is_starter else Path(str(source.path)).stem


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


def _load_raw_dataset(source: SourceConfig) -> pa.Table:
    """A whole split as an Arrow table through `datasets` (hub ids, or local files for conversations)."""
    if source.hub:
        loaded = load_hub_split(source.hub, source.split, source.name,
                                hint="point the source at a local file (path: ...)")
        return loaded.with_format("arrow")[:]
    import datasets

    path = Path(str(source.path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() else [str(path)]
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}[Path(files[0]).suffix]
    return datasets.load_dataset(kind, data_files=files, split="train").with_format("arrow")[:]


def _read(source: SourceConfig, contract: Contract, dropped: list[DroppedRow] | None) -> pa.Table:
    name = f"hub:{source.hub}" if source.hub else str(source.path)
    rows = {"drop_invalid": source.drop_invalid_rows, "max_dropped_share": source.max_dropped_share,
            "dropped": dropped}
    if source.is_starter:
        return read_table(_starter_table(contract), contract, source_name=f"starter:{contract.name}", **rows)
    if source.conversations or source.hub:
        raw = _load_raw_dataset(source)
        if source.conversations:
            raw = flatten_conversations(raw, contract, dict(source.column_map), name)
        return read_table(raw, contract, column_map=dict(source.column_map), source_name=name, **rows)
    return read_table(Path(str(source.path)).expanduser(), contract, column_map=dict(source.column_map), **rows)


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
                stratify: str | None = None, whole: Collection[str] = (),
                dropped: list[DroppedRow] | None = None) -> pa.Table:
    """Read and validate one source; fill missing id/source columns; apply source.limit, then ``limit``
    (``whole``: ``stratify`` groups kept in full, see ``limit_rows``). With ``source.drop_invalid_rows`` the rows
    that break a row-level rule are left out before the limits, each appended to ``dropped``."""
    contract = get_contract(contract)
    try:
        table = _read(source, contract, dropped)
    except ContractError as err:
        missing = _missing_fillable(err)
        if missing is None:
            raise
        table = _fill(_read(source, _relaxed(contract, missing), dropped), contract, missing, source_label(source))
        table = read_table(table, contract, source_name=err.source)
    table = limit_rows(table, source.limit, source.seed)
    return limit_rows(table, limit, seed, stratify, whole)


DROPPED_ROWS = "dropped_rows"  # a source artifact's meta key (and the run summary's): what drop_invalid_rows left out
MAX_LISTED = 20  # dropped rows listed by (source, row, id); all are counted and logged


def dropped_summary(dropped: list[DroppedRow]) -> dict[str, Any]:
    """{"rows": how many rows were dropped, "rules": {rule: rows}, "first": [{source, row, id, rules}, ...]}."""
    rules: dict[str, int] = {}
    for row in dropped:
        for rule in row.rules:
            rules[rule] = rules.get(rule, 0) + 1
    first = [{"source": d.source, "row": d.row, "id": d.id, "rules": list(d.rules)} for d in dropped[:MAX_LISTED]]
    return {"rows": len(dropped), "rules": dict(sorted(rules.items())), "first": first}


def dropped_text(summary: dict[str, Any], read: int | None = None) -> str:
    """One line for a report: '1 of 620 rows dropped as invalid (rejected.equals_chosen 1): x.parquet row 264 (id 264)'."""
    n = summary["rows"]
    of = f" of {read}" if read else ""
    if not n:
        return f"0{of} rows dropped as invalid"
    rules = ", ".join(f"{rule} {count}" for rule, count in summary["rules"].items())
    listed = "; ".join(f"{Path(str(d['source'])).name} row {d['row']}" + (f" (id {d['id']})" if d["id"] is not None
                                                                           else "") for d in summary["first"])
    more = f"; {n - len(summary['first'])} more in the log" if n > len(summary["first"]) else ""
    return f"{n}{of} row{'s' if n > 1 or read else ''} dropped as invalid ({rules}): {listed}{more}"


def dropped_params(role: str, summary: dict[str, Any]) -> dict[str, int]:
    """MLflow params of one source's dropped rows: dropped_rows.<role> and dropped_rows.<role>.<rule>."""
    return {f"{DROPPED_ROWS}.{role}": summary["rows"],
            **{f"{DROPPED_ROWS}.{role}.{rule}": count for rule, count in summary["rules"].items()}}
