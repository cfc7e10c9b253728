"""validate(): check a table against a contract and return it conformed to the contract's schema.

All rules run (vectorised with pyarrow.compute) before anything is raised, so one ``ContractError`` lists
every violation: the source, the column, the offending row indices and the first few values, and what
was expected. pyarrow does not enforce ``nullable=False``, so nulls are checked here explicitly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from data_contracts.schemas import Contract, get_contract

MAX_ROWS_SHOWN = 5
LOG = logging.getLogger("gram.contracts")
MAX_VALUE_CHARS = 40
# Share of a table's rows that ``drop_invalid`` may leave out; past it the table is refused (SourceConfig's default).
MAX_DROPPED_SHARE = 0.05
# Characters that show nothing: whitespace (any script), NUL and the other C0 controls, zero-width space,
# joiners, word joiner, BOM. A text made only of them is blank.
INVISIBLE = r"[\s\pZ\x{0}-\x{8}\x{E}-\x{1F}\x{7F}\x{200B}-\x{200D}\x{2060}\x{FEFF}]"


@dataclass(frozen=True)
class Violation:
    """One broken rule on one column; ``rows`` and ``values`` hold only the first few offenders. ``rule`` names a
    row-level rule (e.g. 'rejected.equals_chosen'), whose rows can be dropped; '' for a rule on the whole table."""

    column: str
    problem: str
    expected: str
    n_rows: int = 0
    rows: tuple[int, ...] = ()
    values: tuple[str, ...] = ()
    rule: str = ""

    def describe(self) -> str:
        text = f"column {self.column!r}: {self.problem}"
        if self.n_rows:
            more = f" (first {len(self.rows)})" if self.n_rows > len(self.rows) else ""
            text += f" in {self.n_rows} row(s); rows{more} {list(self.rows)}"
            if self.values:
                text += f", values {', '.join(self.values)}"
        return f"{text}; expected {self.expected}"


@dataclass(frozen=True)
class RowRule:
    """A row-level rule some rows break: the violation to report, and the mask of those rows (True = broken)."""

    violation: Violation
    mask: pa.ChunkedArray | pa.Array

    @property
    def key(self) -> str:
        return self.violation.rule


@dataclass(frozen=True)
class DroppedRow:
    """A row left out by ``drop_invalid``: where it was (source, 0-based row), its id, the rules it broke."""

    source: str
    row: int
    id: Any
    rules: tuple[str, ...]


class ContractError(ValueError):
    """A table broke its contract; ``violations`` lists every broken rule."""

    def __init__(self, source: str, contract: Contract, violations: list[Violation]):
        self.source = source
        self.contract = contract
        self.violations = list(violations)
        lines = [f"{source}: {len(violations)} violation(s) of contract "
                 f"{contract.name!r} v{contract.version}:"]
        lines += [f"  - {v.describe()}" for v in violations]
        super().__init__("\n".join(lines))


class TooManyInvalidRows(ContractError):
    """More rows break row-level rules than ``max_dropped_share`` lets ``drop_invalid`` leave out."""

    def __init__(self, source: str, contract: Contract, violations: list[Violation], n_bad: int, n_rows: int,
                 counts: dict[str, int], max_share: float, first: list[int]):
        super().__init__(source, contract, violations)
        self.n_bad, self.n_rows, self.counts, self.max_share = n_bad, n_rows, dict(counts), max_share
        rules = ", ".join(f"{rule} {count}" for rule, count in sorted(counts.items()))
        self.args = (f"{source}: {n_bad} of {n_rows} rows ({100 * n_bad / n_rows:.1f} %) break row-level rules of "
                     f"contract {contract.name!r} v{contract.version} ({rules}; rows{' (first)' if n_bad > len(first) else ''} "
                     f"{first}), more than may be dropped (max_dropped_share {100 * max_share:g} %); fix the file, or "
                     "raise max_dropped_share if that many bad rows are expected",)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _rows_violation(table: pa.Table, mask, column: str, problem: str, expected: str,
                    show: tuple[str, ...] | None = None, rule: str = "") -> Violation | None:
    """A violation for the rows where ``mask`` is true (None when there are none)."""
    n_bad = pc.sum(mask).as_py() or 0
    if n_bad == 0:
        return None
    indices = pc.indices_nonzero(mask).slice(0, MAX_ROWS_SHOWN)
    values: tuple[str, ...] = ()
    if show:
        sample = table.select(list(show)).take(indices).to_pylist()
        if len(show) == 1:
            values = tuple(_short(row[show[0]]) for row in sample)
        else:
            values = tuple("{" + ", ".join(f"{k}={_short(v)}" for k, v in row.items()) + "}" for row in sample)
    return Violation(column, problem, expected, n_bad, tuple(indices.to_pylist()), values, rule)


def _row_rule(table: pa.Table, mask, column: str, problem: str, expected: str, rule: str,
              show: tuple[str, ...] | None = None) -> RowRule | None:
    violation = _rows_violation(table, mask, column, problem, expected, show, rule)
    return None if violation is None else RowRule(violation, mask)


def _conform_type(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray | None:
    """``column`` cast to ``target`` when that loses nothing (e.g. large_string→string, int32→int64)."""
    source = column.type
    if pa.types.is_dictionary(source):
        column, source = column.cast(source.value_type), source.value_type
    if source == target:
        return column
    string_like = (pa.types.is_string(source) or pa.types.is_large_string(source)
                   or pa.types.is_string_view(source))
    lossless = (
        pa.types.is_null(source)  # an all-null column: the null check reports it
        or (pa.types.is_string(target) and string_like)
        or (pa.types.is_integer(target) and pa.types.is_integer(source))
        or (pa.types.is_floating(target) and (pa.types.is_floating(source) or pa.types.is_integer(source)))
    )
    if not lossless:
        return None
    try:
        return column.cast(target, safe=True)  # safe: overflow or precision loss raises
    except pa.ArrowInvalid:
        return None


def _invalid_utf8_rows(column: pa.ChunkedArray) -> list[int]:
    """Rows of a string column whose bytes are not UTF-8 (pyarrow does not check this when reading)."""
    bad, offset = [], 0
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            for i, value in enumerate(chunk.cast(pa.binary()).to_pylist()):
                if value is not None:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        bad.append(offset + i)
        offset += len(chunk)
    return bad


def _structure(table: pa.Table, contract: Contract) -> tuple[dict[str, pa.ChunkedArray], list[Violation],
                                                            list[RowRule]]:
    """Present, correctly typed columns (cast where lossless), the missing/mistyped ones, and the cells that are not
    UTF-8 (a row-level rule; those cells come back null, so later checks can run)."""
    columns: dict[str, pa.ChunkedArray] = {}
    violations: list[Violation] = []
    cells: list[RowRule] = []
    present = table.schema.names
    for field in contract.schema:
        count = present.count(field.name)
        if count == 0:
            violations.append(Violation(field.name, "missing column",
                                        f"a {field.type} column (table has {present})"))
            continue
        if count > 1:
            violations.append(Violation(field.name, f"column appears {count} times", "exactly one column"))
            continue
        conformed = _conform_type(table[field.name], field.type)
        if conformed is None:
            violations.append(Violation(field.name, f"wrong type {table.schema.field(field.name).type}",
                                        f"{field.type} (or a type that casts to it losslessly)"))
            continue
        bad_utf8 = _invalid_utf8_rows(conformed) if pa.types.is_string(field.type) else []
        if bad_utf8:  # e.g. from a Parquet file written without checks; every later check would crash on it
            bad = set(bad_utf8)
            mask = pa.array([i in bad for i in range(len(conformed))])
            cells.append(RowRule(Violation(field.name, "invalid UTF-8", "text encoded as UTF-8", len(bad_utf8),
                                           tuple(bad_utf8[:MAX_ROWS_SHOWN]), rule=f"{field.name}.invalid_utf8"), mask))
            conformed = pc.if_else(mask, pa.scalar(None, pa.binary()), conformed.cast(pa.binary())).cast(pa.string())
        columns[field.name] = conformed
    return columns, violations, cells


def _row_rules(table: pa.Table, contract: Contract, flagged: list[RowRule]) -> list[RowRule]:
    """Nulls, blank text and value domains on the columns that are present: the rules one row can break.
    ``flagged``: cells a reader already reported (emptied to null), not reported again as null."""
    names = set(table.schema.names)
    found: list[RowRule | None] = []
    for name in table.schema.names:
        if table[name].null_count:
            mask = pc.is_null(table[name])
            for rule in flagged:
                if rule.violation.column == name:
                    mask = pc.and_(mask, pc.invert(rule.mask))
            found.append(_row_rule(table, mask, name, "null value", f"a non-null {contract.schema.field(name).type}",
                                   f"{name}.null"))
    for name in contract.non_empty:
        if name in names:
            found.append(_row_rule(table, _blank(table[name]), name, "empty or whitespace-only string",
                                   "a non-empty string (NUL, control and zero-width characters count as whitespace)",
                                   f"{name}.blank", show=(name,)))
    for check in contract.checks:
        try:
            mask = check.bad_rows(table)
        except KeyError:  # a column it needs is missing or mistyped: already reported
            continue
        shown = tuple(c for c in check.show if c in names) or None
        found.append(_row_rule(table, mask, check.column, "value outside its domain", check.expected, check.rule,
                               show=shown))
    return [r for r in found if r is not None]


def _id_violations(table: pa.Table, contract: Contract) -> list[Violation]:
    """Repeated ids: a rule on the table as a whole (which of two rows is the wrong one cannot be known)."""
    id_col = contract.id_column
    if not id_col or id_col not in table.schema.names:
        return []
    ids = table[id_col]
    # Ids that differ only by whitespace or invisible characters name the same row to a person.
    key = pc.replace_substring_regex(ids, INVISIBLE, "") if pa.types.is_string(ids.type) else ids
    counts = pc.value_counts(key.drop_null())
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if not len(repeated):
        return []
    mask = pc.is_in(key, value_set=repeated)
    found = _rows_violation(table, mask, id_col, f"duplicate id ({len(repeated)} value(s) repeated, "
                            "whitespace ignored)", "unique ids", show=(id_col,))
    return [found] if found else []


def _blank(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """True where a text shows nothing: empty, or only whitespace, NUL, control or zero-width characters."""
    visible = pc.replace_substring_regex(column, INVISIBLE, "")
    return pc.fill_null(pc.equal(pc.utf8_length(visible), 0), False)


def drop_invalid_rows(table: pa.Table, rules: list[RowRule], contract: Contract, source: str,
                      max_share: float = MAX_DROPPED_SHARE) -> tuple[pa.Table, list[DroppedRow]]:
    """``table`` without the rows that break ``rules``, and those rows (source, row, id, rules), one each.
    ``TooManyInvalidRows`` when more than ``max_share`` of the rows would go."""
    if not rules or table.num_rows == 0:
        return table, []
    bad = rules[0].mask
    for rule in rules[1:]:
        bad = pc.or_(bad, rule.mask)
    broken: dict[int, list[str]] = {}
    counts: dict[str, int] = {}
    for rule in rules:
        rows = pc.indices_nonzero(rule.mask).to_pylist()
        counts[rule.key] = counts.get(rule.key, 0) + len(rows)
        for row in rows:
            broken.setdefault(row, []).append(rule.key)
    if len(broken) / table.num_rows > max_share:
        raise TooManyInvalidRows(source, contract, [r.violation for r in rules], len(broken), table.num_rows, counts,
                                 max_share, sorted(broken)[:MAX_ROWS_SHOWN])
    ids = table[contract.id_column] if contract.id_column in table.schema.names else None
    gone = [DroppedRow(source, row, ids[row].as_py() if ids is not None else None, tuple(broken[row]))
            for row in sorted(broken)]
    return table.filter(pc.invert(bad)), gone


def _log_dropped(gone: list[DroppedRow], rules: list[RowRule], contract: Contract) -> None:
    """One warning per dropped row: source, row, id, and each rule it broke in words."""
    words = {r.key: f"{r.violation.problem}; expected {r.violation.expected}" for r in rules}
    for row in gone:
        where = f"{contract.id_column} {row.id!r}" if contract.id_column else "no id column"
        LOG.warning("%s: dropped row %d (%s): %s", row.source, row.row, where,
                    "; ".join(f"{key} ({words[key]})" for key in row.rules))


def validate(table: pa.Table, contract: Contract | str, source: str = "<in-memory>", *, drop_invalid: bool = False,
             max_dropped_share: float = MAX_DROPPED_SHARE, dropped: list[DroppedRow] | None = None,
             flagged: list[RowRule] | tuple[RowRule, ...] = ()) -> pa.Table:
    """Check ``table`` against ``contract``; return it with the contract's column order, types and metadata.

    Extra columns are dropped. Raises one ``ContractError`` naming ``source`` and listing every violation.
    ``drop_invalid``: leave out (log, and append to ``dropped``) the rows that break a row-level rule (a null, blank
    text, a value outside its domain, text that is not UTF-8) instead of reporting them, unless more than
    ``max_dropped_share`` of the rows would go (``TooManyInvalidRows``). Rules on the table as a whole (a missing,
    repeated or mistyped column, repeated ids) are always reported. ``flagged``: row-level rules a reader found in
    cells it passed on as null (e.g. a lone surrogate in JSON).
    """
    contract = get_contract(contract)
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if not isinstance(table, pa.Table):
        raise TypeError(f"{source}: validate() needs a pyarrow.Table, got {type(table).__name__}")
    columns, violations, cells = _structure(table, contract)
    partial = pa.table(columns) if columns else pa.table({})
    flagged = [*flagged, *cells]
    rules = [*flagged, *_row_rules(partial, contract, flagged)]
    gone: list[DroppedRow] = []
    if drop_invalid:
        if violations:  # the table as a whole first: its rows are dropped once it is right
            raise ContractError(source, contract, violations)
        partial, gone = drop_invalid_rows(partial, rules, contract, source, max_dropped_share)
    violations += ([] if drop_invalid else [r.violation for r in rules]) + _id_violations(partial, contract)
    if violations:
        raise ContractError(source, contract, violations)
    _log_dropped(gone, rules, contract)  # only once the table is accepted: a refused file drops nothing
    if dropped is not None:
        dropped.extend(gone)
    return pa.Table.from_arrays([partial[n] for n in contract.columns], schema=contract.schema)
