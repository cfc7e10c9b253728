"""Drill 9: property-based fuzzing (hypothesis) of validate() and the file readers.

Random preference tables, with at most one injected defect (a missing column, a null, an empty or
whitespace-only string, a value of the wrong type) and arbitrary unicode text, go through validate() and
through every file format. Properties: a clean table comes back with exactly its values (no coercion); a
defect is always a ContractError whose violation names the column, and the row when the defect is in a
row; nothing else is ever raised.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import tempfile
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_contracts import PREFERENCE_PAIRS, ContractError, read_table, validate

COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "source")
# A fixed seed (derandomize): every run draws the same examples, so a failure reproduces.
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def visible(text: str) -> bool:
    """Whether ``text`` shows something (the contract's blank rule: whitespace, NUL, zero-width are nothing)."""
    return bool(re.sub(r"[\s\x00-\x08\x0e-\x1f\x7f\u200b-\u200d\u2060\ufeff]", "",
                       "".join(c for c in text if unicodedata.category(c) != "Zs")))


# Any unicode text but lone surrogates (not encodable as UTF-8), never blank.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12).filter(visible)


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


# --------------------------------------------------------------------------------------------------
# Drill 5: each confirmed crash and silent slip is a contract error naming the file, row and column.
# --------------------------------------------------------------------------------------------------
def _pair(pair_id="p-0", **values):
    return {"pair_id": pair_id, "prompt": "Which?", "chosen": "yes", "rejected": "no", "source": "s", **values}


def _bench(row_id=0, **values):
    return {"id": row_id, "prompt": "Which?", "chosen": "yes", "chosen_model": "m", "rejected": "no",
            "rejected_model": "n", "subset": "chat", **values}


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()  # ensure_ascii: a surrogate stays "\ud800"


def _bad_utf8_parquet(path: Path) -> None:
    text = pa.array([b"yes", b"caf\xe9"], pa.binary()).view(pa.string())  # not checked by pyarrow
    table = pa.table({"pair_id": ["p-0", "p-1"], "prompt": ["a", "b"], "chosen": text,
                      "rejected": ["n", "m"], "source": ["s", "s"]})
    pq.write_table(table, path)


BAD_INPUT = {  # name: (contract, file name, writer(path) or bytes, column, row or None)
    "lone surrogate": ("preference_pairs", "d.jsonl", _jsonl([_pair(), _pair("p-1", prompt="\ud800")]), "prompt", 1),
    "id 2**70": ("rewardbench", "d.jsonl", _jsonl([_bench(), _bench(2**70)]), "id", 1),
    "invalid UTF-8 in Parquet": ("preference_pairs", "d.parquet", _bad_utf8_parquet, "chosen", 1),
    "malformed JSON line": ("preference_pairs", "d.jsonl", _jsonl([_pair()]) + b"{not json\n", "(record)", 1),
    "non-UTF-8 JSONL line": ("preference_pairs", "d.jsonl", _jsonl([_pair()]) + b'{"prompt": "caf\xe9"}\n',
                             "(record)", 1),
    "non-UTF-8 JSON file": ("preference_pairs", "d.json", b'[{"prompt": "caf\xe9"}]', "(file)", None),
    "malformed JSON file": ("preference_pairs", "d.json", b'[{"prompt": ', "(file)", None),
    "non-object record": ("preference_pairs", "d.json", json.dumps([_pair(), ["p-1"]]).encode(), "(record)", 1),
    "RewardBench chosen == rejected": ("rewardbench", "d.jsonl", _jsonl([_bench(), _bench(1, rejected="yes")]),
                                       "rejected", 1),
    "NUL-only text": ("preference_pairs", "d.jsonl", _jsonl([_pair(), _pair("p-1", chosen="\x00\x00")]), "chosen", 1),
    "zero-width-only text": ("preference_pairs", "d.jsonl", _jsonl([_pair("p-1", prompt="\u200b\u200d\ufeff")]),
                             "prompt", 0),
    "ids differing only by whitespace": ("preference_pairs", "d.jsonl",
                                         _jsonl([_pair("p 1"), _pair("p1"), _pair("p-2")]), "pair_id", 1),
    "header-only CSV": ("preference_pairs", "d.csv", b"pair_id,prompt,chosen,rejected,source\n", "(file)", None),
    "subfolder in a data folder": ("preference_pairs", "data/d.jsonl", _jsonl([_pair()]), "(folder)", None),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_drill_bad_input_is_a_contract_error_naming_file_row_and_column(case, tmp_path):
    """Each one crashed (UnicodeEncodeError, OverflowError, a raw ArrowInvalid), was "unexpected" (exit 1) or
    passed silently; now a ContractError (the CLI's exit 2) names the file, the column and the row."""
    from flows.errors import is_expected

    contract, name, content, column, row = BAD_INPUT[case]
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    content(path) if callable(content) else path.write_bytes(content)
    source = path
    if case == "subfolder in a data folder":
        (path.parent / "more").mkdir()
        source = path.parent
    with pytest.raises(ContractError) as info:
        read_table(source, contract)
    err = info.value
    assert is_expected(err) and str(source) in str(err)
    named = [v for v in err.violations if v.column == column]
    assert named, str(err)
    if row is not None:
        assert any(row in v.rows for v in named), str(err)


def _any_text(long: bool = False):
    """Full Unicode, lone surrogates included, sometimes long."""
    return st.text(st.characters(codec=None, exclude_categories=()), max_size=3000 if long else 16)


def _value(field: pa.Field):
    if pa.types.is_string(field.type):
        return st.one_of(_any_text(), _any_text(long=True), st.sampled_from(["\ud800", "\x00", "\u200b", " "]))
    if pa.types.is_integer(field.type):
        return st.one_of(st.integers(-5, 5), st.integers())  # unbounded: beyond int64 too
    if pa.types.is_floating(field.type):
        return st.floats(0, 1)
    if pa.types.is_boolean(field.type):
        return st.booleans()
    raise AssertionError(f"no strategy for {field.type}")


@st.composite
def contract_rows(draw):
    """(contract, rows): 0-5 rows of any contract with arbitrary values; sometimes a duplicated row."""
    from data_contracts.schemas import CONTRACTS

    contract = CONTRACTS[draw(st.sampled_from(sorted(CONTRACTS)))]
    rows = [{f.name: draw(_value(f)) for f in contract.schema} for _ in range(draw(st.integers(0, 5)))]
    if rows and draw(st.booleans()):
        rows.append(dict(rows[0]))  # a duplicate
    return contract, rows


def _write(path: Path, fmt: str, rows: list[dict], contract) -> None:
    if fmt == "jsonl":
        path.write_bytes(_jsonl(rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as handle:
            writer = csv.DictWriter(handle, fieldnames=contract.columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        columns = {f.name: [r[f.name] for r in rows] for f in contract.schema}
        pq.write_table(pa.table({k: pa.array([v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v
                                              for v in vals]) for k, vals in columns.items()}), path)


@contextlib.contextmanager
def _written(rows, fmt: str, contract):
    """A temporary ``data.<fmt>`` holding ``rows``; None when pyarrow cannot even write them (an int beyond
    int64 in Parquet): then there is no file to read."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data.{fmt}"
        try:
            _write(path, fmt, rows, contract)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            path = None
        yield path


@FUZZ
@given(contract_rows(), st.sampled_from(["jsonl", "json", "csv", "parquet"]))
def test_every_contract_and_reader_gives_a_table_or_a_contract_error(case, fmt):
    """Any values (surrogates, NUL, huge ints, long texts, duplicates, no rows) in any contract and format: the
    reader returns the rows or raises ContractError; nothing else."""
    contract, rows = case
    with _written(rows, fmt, contract) as path:
        if path is None:
            return
        try:
            table = read_table(path, contract)
        except ContractError as err:
            assert err.violations and str(path) in str(err)
            return
        assert rows and table.num_rows == len(rows)


@FUZZ
@given(contract_rows(), st.sampled_from(["jsonl", "json", "csv", "parquet"]))
def test_dropping_invalid_rows_keeps_only_valid_rows_and_accounts_for_every_row(case, fmt):
    """drop_invalid on any values, any contract and format: a ContractError with nothing dropped, or a table that
    passes the strict contract, whose rows plus the dropped ones (each once, in order) are the file's rows."""
    contract, rows = case
    with _written(rows, fmt, contract) as path:
        if path is None:
            return
        dropped = []
        try:
            table = read_table(path, contract, drop_invalid=True, max_dropped_share=1.0, dropped=dropped)
        except ContractError as err:
            assert err.violations and str(path) in str(err) and dropped == []
            return
        assert validate(table, contract).num_rows == table.num_rows == len(rows) - len(dropped)
        assert [d.row for d in dropped] == sorted({d.row for d in dropped}) and all(d.rules for d in dropped)


# --------------------------------------------------------------------------------------------------
# The strong checks for every contract: clean rows come back exactly; one defect (a missing column, a null, a
# blank text, a value of another JSON type, a nested list or object, a float outside [0, 1]) is a ContractError
# naming its column, and its row for a row-level defect.
# --------------------------------------------------------------------------------------------------
def _nested(depth: int, leaf):
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"v": value}
    return value


OUT_OF_UNIT = [-0.5, 1.5, -1e-9, 1.000001, 1e300, float("inf"), float("-inf"), float("nan")]


from data_contracts.schemas import CONTRACTS  # noqa: E402 - the strong checks below cover every contract

STRONG = settings(max_examples=8, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
ROW_KINDS = ("null", "blank", "wrong_type", "nested")
TABLE_KINDS = ("none", "missing", "float_range")


def _kinds(row_level: bool) -> list[tuple[str, str]]:
    """(contract, defect kind) for every contract and every kind that applies to it."""
    out = []
    for name, contract in sorted(CONTRACTS.items()):
        floats = any(pa.types.is_floating(f.type) for f in contract.schema)
        for kind in (TABLE_KINDS + ROW_KINDS if row_level else TABLE_KINDS):
            if (kind == "float_range" and not floats) or (kind == "blank" and not contract.non_empty):
                continue
            out.append((name, kind))
    return out


@st.composite
def contract_cases(draw, name: str, kind: str):
    """(rows, defect): 1-5 rows valid under contract ``name``, then one defect of ``kind`` (kind, column, row)
    or none."""
    contract = CONTRACTS[name]
    n = draw(st.integers(1, 5))
    rows = []
    for i in range(n):
        row = {}
        for f in contract.schema:
            if f.name == contract.id_column:
                row[f.name] = i if pa.types.is_integer(f.type) else f"id-{i}"
            elif pa.types.is_string(f.type):
                row[f.name] = draw(TEXT)
            elif pa.types.is_floating(f.type):
                row[f.name] = draw(st.floats(0, 1))
        if "rejected" in row and row["rejected"] == row["chosen"]:
            row["rejected"] += " (other)"
        if "p_chosen" in row:
            row["p_chosen"] = (row["p_chosen_order1"] + row["p_chosen_order2"]) / 2
            row["correct"] = row["p_chosen"] > 0.5
        rows.append(row)
    if kind == "none":
        return rows, None
    floats = [f.name for f in contract.schema if pa.types.is_floating(f.type)]
    choices = floats if kind == "float_range" else list(contract.non_empty) if kind == "blank" else contract.columns
    column, row = draw(st.sampled_from(choices)), draw(st.integers(0, n - 1))
    if kind == "missing":
        for r in rows:
            del r[column]
    elif kind == "null":
        rows[row][column] = None
    elif kind == "blank":
        rows[row][column] = draw(st.sampled_from(["", " ", "\u3000", "\u200b"]))
    elif kind == "wrong_type":
        current = rows[row][column]
        rows[row][column] = draw(st.sampled_from([v for v in ("0.5", 7, True, "x", 0.25)
                                                  if type(v) is not type(current)]))
    elif kind == "nested":
        rows[row][column] = _nested(draw(st.integers(1, 60)), draw(st.sampled_from(["x", 0.5, 1, True])))
    elif kind == "float_range":
        rows[row][column] = draw(st.sampled_from(OUT_OF_UNIT))
    return rows, (kind, column, row)


def _strong(read, rows, defect) -> None:
    """Clean: exactly the rows (nothing coerced). A defect: a ContractError naming the column (and the row)."""
    if defect is None:
        assert read().to_pylist() == rows
        return
    kind, column, row = defect
    with pytest.raises(ContractError) as info:
        read()
    named = [v for v in info.value.violations if v.column == column]
    assert named, f"{kind} in {column!r} not named: {info.value}"
    if kind != "missing":
        assert any(row in v.rows for v in named), f"{kind} at row {row} of {column!r} not named: {info.value}"


def _reader(fmt: str, name: str, rows: list[dict], tmp: Path):
    """Write ``rows`` as ``fmt`` (JSON Lines, JSON, a typed table for validate(), Parquet); return how to read them
    back through the contract ``name``."""
    contract = CONTRACTS[name]
    if fmt in ("jsonl", "json"):
        path = tmp / f"data.{fmt}"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) if fmt == "jsonl" else json.dumps(rows))
        return lambda: read_table(path, name)
    present = [f for f in contract.schema if f.name in rows[0]]
    table = pa.table({f.name: pa.array([r[f.name] for r in rows], f.type) for f in present})
    if fmt == "validate":
        return lambda: validate(table, contract)
    path = tmp / "data.parquet"
    pq.write_table(table, path)
    return lambda: read_table(path, contract)


def _fuzz(name: str, kind: str, fmt: str) -> None:
    @STRONG
    @given(contract_cases(name, kind))
    def check(case):
        rows, defect = case
        with tempfile.TemporaryDirectory() as tmp:
            _strong(_reader(fmt, name, rows, Path(tmp)), rows, defect)

    check()


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize("name, kind", _kinds(row_level=True))
def test_every_contract_names_each_defect_in_json_and_coerces_nothing(name, kind, fmt):
    _fuzz(name, kind, fmt)


@pytest.mark.parametrize("fmt", ["validate", "parquet"])
@pytest.mark.parametrize("name, kind", _kinds(row_level=False))
def test_every_contract_names_each_defect_in_tables_and_parquet(name, kind, fmt):
    """Typed tables (missing columns, floats outside [0, 1] incl. NaN and inf) through validate() and Parquet."""
    _fuzz(name, kind, fmt)
