"""Drill 9: property-based fuzzing (hypothesis) of validate() and the file readers.

Random preference tables, with at most one injected defect (a missing column, a null, an empty or
whitespace-only string, a value of the wrong type) and arbitrary unicode text, go through validate() and
through every file format. Properties: a clean table comes back with exactly its values (no coercion); a
defect is always a ContractError whose violation names the column, and the row when the defect is in a
row; nothing else is ever raised.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_contracts import PREFERENCE_PAIRS, ContractError, read_table, validate

COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "source")
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Any unicode text but lone surrogates (not encodable as UTF-8), never blank.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12).filter(lambda s: s.strip())


@st.composite
def tables(draw, row_defects: bool = True):
    """(rows as dicts, defect) where defect is None or (kind, column, row)."""
    n = draw(st.integers(1, 5))
    rows = [{"pair_id": f"id-{i}", **{c: draw(TEXT) for c in COLUMNS[1:]}} for i in range(n)]
    for row in rows:
        if row["chosen"] == row["rejected"]:
            row["rejected"] += " (other)"
    kinds = ["none", "missing", "wrong_type_column"] + (["null", "blank", "wrong_type_value"] if row_defects else [])
    kind = draw(st.sampled_from(kinds))
    column, row = draw(st.sampled_from(COLUMNS)), draw(st.integers(0, n - 1))
    if kind == "none":
        return rows, None
    if kind == "missing":
        for r in rows:
            del r[column]
    elif kind == "wrong_type_column":
        for i, r in enumerate(rows):
            r[column] = i
    elif kind == "null":
        rows[row][column] = None
    elif kind == "blank":
        rows[row][column] = draw(st.sampled_from(["", " ", "\t", "\n ", "\u3000"]))
    elif kind == "wrong_type_value":
        rows[row][column] = draw(st.sampled_from([7, 1.5, True, ["x"], {"a": 1}]))
    return rows, (kind, column, row)


def check_error(err: ContractError, defect) -> None:
    kind, column, row = defect
    named = [v for v in err.violations if v.column == column]
    assert named, f"{kind} in {column!r} not named: {err}"
    if kind in ("null", "blank", "wrong_type_value"):
        assert any(row in v.rows for v in named), f"{kind} at row {row} of {column!r} not named: {err}"


def expect(read, rows, defect) -> None:
    if defect is None:
        table = read()
        assert table.to_pylist() == rows  # exactly the input values: nothing coerced
        return
    with pytest.raises(ContractError) as info:
        read()
    check_error(info.value, defect)


@FUZZ
@given(tables(row_defects=False))
def test_validate_names_every_defect_and_coerces_nothing(case):
    rows, defect = case
    columns = {c: [r[c] for r in rows] for c in COLUMNS if c in rows[0]}
    expect(lambda: validate(pa.table(columns), PREFERENCE_PAIRS), rows, defect)


@FUZZ
@given(tables(), st.sampled_from(["jsonl", "json"]))
def test_json_readers_name_column_and_row_and_coerce_nothing(case, fmt):
    rows, defect = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        else:
            path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        expect(lambda: read_table(path, PREFERENCE_PAIRS), rows, defect)


@FUZZ
@given(tables(row_defects=False))
def test_parquet_reader_names_the_column_and_coerces_nothing(case):
    rows, defect = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        pq.write_table(pa.table({c: [r[c] for r in rows] for c in COLUMNS if c in rows[0]}), path)
        expect(lambda: read_table(path, PREFERENCE_PAIRS), rows, defect)


@FUZZ
@given(tables())
def test_csv_reader_names_column_and_row_and_keeps_text_as_written(case):
    rows, defect = case
    if defect and defect[0].startswith("wrong_type"):
        return  # CSV has no types: 7 is the text "7"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        present = [c for c in COLUMNS if c in rows[0]]
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=present)
            writer.writeheader()
            writer.writerows({c: r[c] for c in present} for r in rows)
        if defect and defect[0] == "null":  # CSV cannot tell null from empty: an empty field is "blank"
            defect = ("blank", *defect[1:])
        expect(lambda: read_table(path, PREFERENCE_PAIRS), rows if defect else rows, defect)
