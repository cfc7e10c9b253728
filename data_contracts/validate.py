"""validate(): check a table against a contract and return it conformed to the contract's schema.

All rules run (vectorised with pyarrow.compute) before anything is raised, so one ``ContractError`` lists
every violation: the source, the column, the offending row indices and the first few values, and what
was expected. pyarrow does not enforce ``nullable=False``, so nulls are checked here explicitly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from data_contracts.schemas import Contract, get_contract

MAX_ROWS_SHOWN = 5
LOG = logging.getLogger("gram.contracts")
MAX_VALUE_CHARS = 40
# Characters that show nothing: whitespace (any script), NUL and the other C0 controls, zero-width space,
# joiners, word joiner, BOM. A text made only of them is blank.
INVISIBLE = r"[\s\pZ\x{0}-\x{8}\x{E}-\x{1F}\x{7F}\x{200B}-\x{200D}\x{2060}\x{FEFF}]"


@dataclass(frozen=True)
class Violation:
    """One broken rule on one column; ``rows`` and ``values`` hold only the first few offenders."""

    column: str
    problem: str
    expected: str
    n_rows: int = 0
    rows: tuple[int, ...] = ()
    values: tuple[str, ...] = ()

    def describe(self) -> str:
        text = f"column {self.column!r}: {self.problem}"
        if self.n_rows:
            more = f" (first {len(self.rows)})" if self.n_rows > len(self.rows) else ""
            text += f" in {self.n_rows} row(s); rows{more} {list(self.rows)}"
            if self.values:
                text += f", values {', '.join(self.values)}"
        return f"{text}; expected {self.expected}"


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


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _rows_violation(table: pa.Table, mask, column: str, problem: str, expected: str,
                    show: tuple[str, ...] | None = None) -> Violation | None:
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
    return Violation(column, problem, expected, n_bad, tuple(indices.to_pylist()), values)


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


def _structure(table: pa.Table, contract: Contract) -> tuple[dict[str, pa.ChunkedArray], list[Violation]]:
    """Present, correctly typed columns (cast where lossless) and the missing/mistyped ones."""
    columns: dict[str, pa.ChunkedArray] = {}
    violations: list[Violation] = []
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
            violations.append(Violation(field.name, "invalid UTF-8", "text encoded as UTF-8", len(bad_utf8),
                                        tuple(bad_utf8[:MAX_ROWS_SHOWN])))
            continue
        columns[field.name] = conformed
    return columns, violations


def _values(table: pa.Table, contract: Contract) -> list[Violation]:
    """Nulls, empty strings, duplicate ids and value domains on the columns that are present."""
    names = set(table.schema.names)
    found: list[Violation | None] = []
    for name in table.schema.names:
        if table[name].null_count:
            found.append(_rows_violation(table, pc.is_null(table[name]), name, "null value",
                                         f"a non-null {contract.schema.field(name).type}"))
    for name in contract.non_empty:
        if name in names:
            col = table[name]
            blank = _blank(col)
            found.append(_rows_violation(table, blank, name, "empty or whitespace-only string", "a non-empty string "
                                         "(NUL, control and zero-width characters count as whitespace)", show=(name,)))
    id_col = contract.id_column
    if id_col and id_col in names:
        ids = table[id_col]
        # Ids that differ only by whitespace or invisible characters name the same row to a person.
        key = pc.replace_substring_regex(ids, INVISIBLE, "") if pa.types.is_string(ids.type) else ids
        counts = pc.value_counts(key.drop_null())
        repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
        if len(repeated):
            mask = pc.is_in(key, value_set=repeated)
            found.append(_rows_violation(table, mask, id_col, f"duplicate id ({len(repeated)} value(s) repeated, "
                                         "whitespace ignored)", "unique ids", show=(id_col,)))
    for check in contract.checks:
        try:
            mask = check.bad_rows(table)
        except KeyError:  # a column it needs is missing or mistyped: already reported
            continue
        shown = tuple(c for c in check.show if c in names) or None
        found.append(_rows_violation(table, mask, check.column, "value outside its domain", check.expected,
                                     show=shown))
    return [v for v in found if v is not None]


def _blank(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """True where a text shows nothing: empty, or only whitespace, NUL, control or zero-width characters."""
    visible = pc.replace_substring_regex(column, INVISIBLE, "")
    return pc.fill_null(pc.equal(pc.utf8_length(visible), 0), False)


def drop_blank_rows(table: pa.Table, contract: Contract, source: str) -> pa.Table:
    """``table`` without the rows whose required text shows nothing (empty, whitespace, NUL or zero-width
    only); each drop is logged with the source, column and row numbers. Opt-in (SourceConfig.drop_blank_rows)."""
    names = [n for n in contract.non_empty if n in table.schema.names]
    if not names or table.num_rows == 0:
        return table
    mask = None
    for name in names:
        blank = _blank(table[name])
        mask = blank if mask is None else pc.or_(mask, blank)
        rows = [i for i, bad in enumerate(blank.to_pylist()) if bad]
        if rows:
            LOG.warning("%s: dropped %d row(s) whose %r shows no text (rows %s%s)", source, len(rows), name,
                        rows[:MAX_ROWS_SHOWN], ", ..." if len(rows) > MAX_ROWS_SHOWN else "")
    return table.filter(pc.invert(mask))


def validate(table: pa.Table, contract: Contract | str, source: str = "<in-memory>",
             drop_blank: bool = False) -> pa.Table:
    """Check ``table`` against ``contract``; return it with the contract's column order, types and metadata.

    Extra columns are dropped. Raises one ``ContractError`` naming ``source`` and listing every violation.
    ``drop_blank``: drop (and log) rows whose required text shows nothing instead of reporting them.
    """
    contract = get_contract(contract)
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if not isinstance(table, pa.Table):
        raise TypeError(f"{source}: validate() needs a pyarrow.Table, got {type(table).__name__}")
    columns, violations = _structure(table, contract)
    partial = pa.table(columns) if columns else pa.table({})
    if drop_blank and not violations:
        partial = drop_blank_rows(partial, contract, source)
    violations += _values(partial, contract)
    if violations:
        raise ContractError(source, contract, violations)
    return pa.Table.from_arrays([partial[n] for n in contract.columns], schema=contract.schema)
