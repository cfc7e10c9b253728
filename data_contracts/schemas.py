"""The data contracts: one Arrow schema per kind of table the pipeline passes between stages.

Each contract carries its name and version in the schema metadata (``gram.contract``,
``gram.contract_version``), so a Parquet file says which contract it was written under. Besides the
schema, a contract names its unique id column, the string columns that must be non-empty, and value
domain checks (vectorised, pyarrow.compute) that ``validate`` runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

CONTRACT_KEY = b"gram.contract"
VERSION_KEY = b"gram.contract_version"
ID_COLUMN_KEY = b"gram.id_column"
DOMAINS_KEY = b"gram.domains"

# Tolerance for "p_chosen is the mean of both orders": float32 arithmetic upstream is off by ~1e-7.
MEAN_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Check:
    """A value-domain rule: ``bad_rows(table)`` is a boolean mask (True = violation) over the rows.

    ``show`` names the columns whose values an error message prints for offending rows (default: column);
    ``rule`` is the short name logs and counts use for it (default '<column>.domain').
    """

    column: str
    expected: str
    bad_rows: Callable[[pa.Table], pa.ChunkedArray | pa.Array]
    show: tuple[str, ...] = ()
    rule: str = ""

    def __post_init__(self) -> None:
        if not self.show:
            object.__setattr__(self, "show", (self.column,))
        if not self.rule:
            object.__setattr__(self, "rule", f"{self.column}.domain")


@dataclass(frozen=True)
class Contract:
    """A named, versioned table contract: the schema plus the rules pyarrow does not enforce."""

    name: str
    version: int
    schema: pa.Schema
    id_column: str | None = None
    non_empty: tuple[str, ...] = ()
    checks: tuple[Check, ...] = field(default=())

    def __post_init__(self) -> None:
        names = set(self.schema.names)
        for col in (self.id_column, *self.non_empty, *(c.column for c in self.checks)):
            if col is not None and col not in names:
                raise ValueError(f"contract {self.name!r}: column {col!r} is not in its schema {sorted(names)}")
        metadata = {
            CONTRACT_KEY: self.name.encode(),
            VERSION_KEY: str(self.version).encode(),
            DOMAINS_KEY: json.dumps(self.domains, sort_keys=True).encode(),
        }
        if self.id_column:
            metadata[ID_COLUMN_KEY] = self.id_column.encode()
        # Frozen dataclass: attach the metadata once, at definition time.
        object.__setattr__(self, "schema", self.schema.with_metadata(metadata))

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    @property
    def domains(self) -> dict[str, list[str]]:
        """Column -> the value-domain rules on it, in words (also stored in the schema metadata)."""
        out: dict[str, list[str]] = {}
        for check in self.checks:
            out.setdefault(check.column, []).append(check.expected)
        return out


def _string_schema(*names: str) -> pa.Schema:
    return pa.schema([pa.field(n, pa.string(), nullable=False) for n in names])


def _outside_unit_interval(column: str) -> Check:
    # NaN compares false both ways, so it is flagged as outside [0, 1] too.
    def bad(table: pa.Table):
        col = table[column]
        inside = pc.and_(pc.greater_equal(col, 0.0), pc.less_equal(col, 1.0))
        return pc.invert(pc.fill_null(inside, True))

    return Check(column, "a probability in [0, 1] (not NaN)", bad, rule=f"{column}.range")


def _chosen_equals_rejected(table: pa.Table):
    return pc.fill_null(pc.equal(table["chosen"], table["rejected"]), False)


def _correct_mismatch(table: pa.Table):
    # Ties (p_chosen == 0.5) count as wrong: correct = p_chosen > 0.5.
    expected = pc.greater(table["p_chosen"], 0.5)
    return pc.fill_null(pc.not_equal(table["correct"], expected), False)


def _mean_mismatch(table: pa.Table):
    mean = pc.divide(pc.add(table["p_chosen_order1"], table["p_chosen_order2"]), 2.0)
    off = pc.greater(pc.abs(pc.subtract(table["p_chosen"], mean)), MEAN_TOLERANCE)
    return pc.fill_null(off, False)


RESPONSE_POOL = Contract(
    name="response_pool",
    version=1,
    schema=_string_schema("prompt_id", "prompt", "response", "generator", "source"),
    # Several responses share a prompt_id (one per generator): it is a group key, not a unique id.
    id_column=None,
    non_empty=("prompt_id", "prompt", "response", "generator", "source"),
)

UNLABELED_PAIRS = Contract(
    name="unlabeled_pairs",
    version=1,
    schema=_string_schema("pair_id", "prompt", "response_a", "response_b", "source"),
    id_column="pair_id",
    non_empty=("pair_id", "prompt", "response_a", "response_b", "source"),
)

PREFERENCE_PAIRS = Contract(
    name="preference_pairs",
    version=1,
    schema=_string_schema("pair_id", "prompt", "chosen", "rejected", "source"),
    id_column="pair_id",
    non_empty=("pair_id", "prompt", "chosen", "rejected", "source"),
    checks=(Check("rejected", "a response different from 'chosen'", _chosen_equals_rejected,
                  show=("pair_id", "rejected"), rule="rejected.equals_chosen"),),
)

REWARDBENCH = Contract(
    name="rewardbench",
    version=1,
    schema=pa.schema(
        [pa.field(n, pa.string(), nullable=False)
         for n in ("prompt", "chosen", "chosen_model", "rejected", "rejected_model", "subset")]
        + [pa.field("id", pa.int64(), nullable=False)]
    ),
    id_column="id",
    non_empty=("prompt", "chosen", "chosen_model", "rejected", "rejected_model", "subset"),
    checks=(Check("rejected", "a response different from 'chosen'", _chosen_equals_rejected,
                  show=("id", "rejected"), rule="rejected.equals_chosen"),),
)

SCORES = Contract(
    name="scores",
    version=1,
    schema=pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("subset", pa.string(), nullable=False),
            pa.field("p_chosen_order1", pa.float64(), nullable=False),  # chosen shown in slot A
            pa.field("p_chosen_order2", pa.float64(), nullable=False),  # chosen shown in slot B
            pa.field("p_chosen", pa.float64(), nullable=False),  # mean of the two orders
            pa.field("correct", pa.bool_(), nullable=False),  # p_chosen > 0.5; ties are wrong
        ]
    ),
    id_column="id",
    non_empty=("id", "subset"),
    checks=(
        _outside_unit_interval("p_chosen_order1"),
        _outside_unit_interval("p_chosen_order2"),
        _outside_unit_interval("p_chosen"),
        Check("p_chosen", f"the mean of p_chosen_order1 and p_chosen_order2 (±{MEAN_TOLERANCE:g})",
              _mean_mismatch, show=("p_chosen", "p_chosen_order1", "p_chosen_order2"), rule="p_chosen.mean"),
        Check("correct", "p_chosen > 0.5 (ties count as wrong)", _correct_mismatch,
              show=("correct", "p_chosen"), rule="correct.threshold"),
    ),
)

# Prompts to sample policy responses for (build_pairs' input when data.prompts is set).
PROMPTS = Contract(
    name="prompts",
    version=1,
    schema=_string_schema("prompt_id", "prompt"),
    id_column="prompt_id",
    non_empty=("prompt_id", "prompt"),
)

CONTRACTS: dict[str, Contract] = {
    c.name: c for c in (RESPONSE_POOL, UNLABELED_PAIRS, PREFERENCE_PAIRS, REWARDBENCH, SCORES, PROMPTS)
}


def get_contract(contract: str | Contract) -> Contract:
    """A contract by name (or pass one through); unknown names list the known ones."""
    if isinstance(contract, Contract):
        return contract
    if contract not in CONTRACTS:
        raise KeyError(f"unknown contract {contract!r}; known contracts are {sorted(CONTRACTS)}")
    return CONTRACTS[contract]


def contract_of(schema_or_table: pa.Schema | pa.Table) -> tuple[str, int] | None:
    """(name, version) recorded in a schema's metadata, or None when it carries no contract."""
    schema = schema_or_table.schema if isinstance(schema_or_table, pa.Table) else schema_or_table
    meta = schema.metadata or {}
    if CONTRACT_KEY not in meta:
        return None
    return meta[CONTRACT_KEY].decode(), int(meta.get(VERSION_KEY, b"0").decode())
