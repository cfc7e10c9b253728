"""Read tables from files, folders, Hugging Face datasets or the Hub, always validated; write atomically.

``read_table`` accepts Parquet, JSON Lines, JSON (a list of records or ``{"data": [...]}``) and CSV files, a
folder of such files (concatenated in name order), a ``datasets.Dataset``/``DatasetDict`` or a
``pyarrow.Table``. ``column_map`` renames source columns to contract columns; other columns are dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from data_contracts.schemas import Contract, get_contract
from data_contracts.validate import MAX_DROPPED_SHARE, ContractError, DroppedRow, RowRule, Violation, validate

SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


class _ValueTypeErrors(Exception):
    def __init__(self, violations: list[Violation]):
        self.violations = violations


@dataclasses.dataclass(frozen=True)
class _Rows:
    """What to do with rows that break a row-level rule (``read_table``'s drop_invalid, max_dropped_share,
    dropped)."""

    drop: bool = False
    max_share: float = MAX_DROPPED_SHARE
    dropped: list[DroppedRow] | None = None

    def validate(self, table: pa.Table, contract: Contract, source: str, flagged: list[RowRule] = ()) -> pa.Table:
        return validate(table, contract, source=source, drop_invalid=self.drop, max_dropped_share=self.max_share,
                        dropped=self.dropped, flagged=flagged)


# Violations that concern a whole record or the file, not one column.
RECORD, FILE = "(record)", "(file)"
INT64 = (-(2**63), 2**63)


def _file_violation(problem: str, expected: str) -> _ValueTypeErrors:
    return _ValueTypeErrors([Violation(FILE, problem, expected)])


class DatasetNotCachedError(FileNotFoundError):
    """A Hub dataset was asked for while offline (or the Hub is unreachable) and is not in the local cache."""


def _read_parquet(path: Path, types: dict[str, pa.DataType], lenient: bool = False) -> tuple[pa.Table, list[RowRule]]:
    present = pq.read_schema(path).names
    return pq.read_table(path, columns=[n for n in present if n in types]), []


def _read_jsonl(path: Path, types: dict[str, pa.DataType], lenient: bool = False) -> tuple[pa.Table, list[RowRule]]:
    records, bad = [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append((len(records), f"line {number}: not UTF-8 (byte {exc.start} of the line)"))
                records.append(None)
                continue
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                bad.append((len(records), f"line {number}: not valid JSON ({exc.msg}, column {exc.colno})"))
                records.append(None)
            except RecursionError:  # `[` x 200,000: deeper than the parser's stack, never a record
                bad.append((len(records), f"line {number}: JSON nested too deeply to read"))
                records.append(None)
    if bad:
        raise _ValueTypeErrors([Violation(RECORD, f"unreadable record(s): {'; '.join(p for _, p in bad[:3])}",
                                          "one JSON object per line, UTF-8", len(bad), tuple(r for r, _ in bad[:5]))])
    return _records_table(records, types, path, lenient)


def _read_json(path: Path, types: dict[str, pa.DataType], lenient: bool = False) -> tuple[pa.Table, list[RowRule]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _file_violation(f"not UTF-8 text (line {line}, byte {exc.start})", "a UTF-8 JSON file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _file_violation(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
                              "a JSON list of records or an object {\"data\": [...]}") from None
    except RecursionError:  # `[` x 200,000: deeper than the parser's stack
        raise _file_violation("JSON nested too deeply to read",
                              "a JSON list of records or an object {\"data\": [...]}") from None
    records = data.get("data") if isinstance(data, dict) else data
    if not isinstance(records, list):
        keys = sorted(data)[:10] if isinstance(data, dict) else []
        raise _file_violation(f"a JSON {type(data).__name__} (keys {keys})",
                              "a JSON list of records or an object {\"data\": [...]}")
    return _records_table(records, types, path, lenient)


# The row-level rule of each problem _json_problem finds, by its words: '<column>.<rule>'.
JSON_RULES = {"wrong value type": "wrong_value_type", "not valid Unicode (a lone surrogate)": "lone_surrogate",
              "integer out of range": "out_of_range"}


def _json_problem(value: Any, typ: pa.DataType) -> str | None:
    """What is wrong with a JSON value for the column's type as written (no coercion: 1 is not "1", "1" is not
    1), or None when it fits."""
    if value is None:
        return None  # nulls are reported by validate()
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        if not isinstance(value, str):
            return "wrong value type"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid Unicode (a lone surrogate)"
        return None
    if pa.types.is_boolean(typ):
        return None if isinstance(value, bool) else "wrong value type"
    if pa.types.is_integer(typ):
        if not isinstance(value, int) or isinstance(value, bool):
            return "wrong value type"
        return None if INT64[0] <= value < INT64[1] else "integer out of range"
    if pa.types.is_floating(typ):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "wrong value type"
    return None


def _records_table(records: list, types: dict[str, pa.DataType], path: Path,
                   lenient: bool = False) -> tuple[pa.Table, list[RowRule]]:
    """JSON records -> a table of the wanted columns in their contract types; values of another JSON type
    are a ContractError naming the column and rows (never coerced, never a crash). ``lenient``: such values come
    back as nulls with the row-level rules they break (for ``drop_invalid``)."""
    keys: set[str] = set()
    not_objects = [i for i, record in enumerate(records) if not isinstance(record, dict)]
    if not_objects:
        shown = tuple(type(records[i]).__name__ for i in not_objects[:5])
        raise _ValueTypeErrors([Violation(RECORD, "not a JSON object", "an object {column: value} per record",
                                          len(not_objects), tuple(not_objects[:5]), shown)])
    for record in records:
        keys.update(record)
    # Only the wanted columns are built, so odd extra fields (nested, mixed) never get in the way.
    columns, violations, rules = {}, [], []
    for name in sorted(keys & set(types)):
        values = [record.get(name) for record in records]
        problems = [(i, _json_problem(v, types[name])) for i, v in enumerate(values)]
        problems = [(i, p) for i, p in problems if p]
        for problem in dict.fromkeys(p for _, p in problems):
            bad = [i for i, p in problems if p == problem]
            shown = tuple(ascii(values[i])[:40] for i in bad[:5])
            violation = Violation(name, problem, f"{types[name]} values (JSON values are not converted)", len(bad),
                                  tuple(bad[:5]), shown, f"{name}.{JSON_RULES[problem]}")
            violations.append(violation)
            marked = set(bad)
            rules.append(RowRule(violation, pa.array([i in marked for i in range(len(values))])))
        if problems and not lenient:
            continue
        for i, _ in problems:
            values[i] = None
        columns[name] = pa.array(values, type=types[name])
    if violations and not lenient:
        raise _ValueTypeErrors(violations)  # _read_file turns it into a ContractError of the contract
    return pa.table(columns), rules


def _read_csv(path: Path, types: dict[str, pa.DataType], lenient: bool = False) -> tuple[pa.Table, list[RowRule]]:
    # Text columns are read as text, so "007" stays "007" and "" stays "" (the validator flags it).
    text = {name: typ for name, typ in types.items() if pa.types.is_string(typ)}
    convert = pa_csv.ConvertOptions(column_types=text, strings_can_be_null=False)
    return pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                           convert_options=convert), []


_READERS = {".parquet": _read_parquet, ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}


def _source_names(contract: Contract, column_map: dict[str, str]) -> dict[str, str]:
    """Contract column -> the source column that feeds it."""
    inverse = {target: src for src, target in column_map.items()}
    return {name: inverse.get(name, name) for name in contract.columns}


def _check_column_map(contract: Contract, column_map: dict[str, str]) -> None:
    unknown = sorted(t for t in column_map.values() if t not in contract.columns)
    if unknown:
        raise ValueError(f"column_map targets {unknown} are not columns of contract {contract.name!r} "
                         f"(columns: {contract.columns})")


def _select(table: pa.Table, contract: Contract, column_map: dict[str, str], source: str) -> pa.Table:
    """Rename mapped columns to contract names and drop the rest (validate reports what is missing)."""
    missing_sources = sorted(src for src in column_map if src not in table.schema.names)
    if missing_sources:
        raise ValueError(f"{source}: column_map names source column(s) {missing_sources} that are not in "
                         f"the data (columns: {table.schema.names})")
    arrays, names = [], []
    for name, src in _source_names(contract, column_map).items():
        for index in table.schema.get_all_field_indices(src):  # duplicates kept: validate reports them
            arrays.append(table.column(index))
            names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def _read_file(path: Path, contract: Contract, column_map: dict[str, str], rows: _Rows) -> pa.Table:
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise ValueError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
                         f"supported: {', '.join(SUPPORTED_SUFFIXES)} or a folder of such files")
    sources = _source_names(contract, column_map)
    types = {sources[f.name]: f.type for f in contract.schema}  # keyed by source column name
    renamed = {src: name for name, src in sources.items()}  # report contract column names

    def contract_names(violation: Violation) -> Violation:
        column = renamed.get(violation.column, violation.column)
        rule = f"{column}.{violation.rule.split('.', 1)[1]}" if violation.rule else ""
        return dataclasses.replace(violation, column=column, rule=rule)

    try:
        raw, flagged = _READERS[suffix](path, types, rows.drop)
    except _ValueTypeErrors as exc:
        raise ContractError(str(path), contract, [contract_names(v) for v in exc.violations]) from None
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowException):
            raise
        raise ContractError(str(path), contract, [Violation(
            FILE, f"cannot be read as {suffix[1:].upper()}: {str(exc).splitlines()[0][:300]}",
            f"a valid {suffix[1:].upper()} file")]) from None
    if raw.num_rows == 0:  # a header-only CSV, an empty list: never a silent empty input
        raise ContractError(str(path), contract, [Violation(FILE, "no rows", "at least one row")])
    flagged = [RowRule(contract_names(r.violation), r.mask) for r in flagged]
    return rows.validate(_select(raw, contract, column_map, str(path)), contract, str(path), flagged)


def _read_path(path: Path, contract: Contract, column_map: dict[str, str], rows: _Rows) -> pa.Table:
    if path.is_file():
        return _read_file(path, contract, column_map, rows)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (expected a {'/'.join(SUPPORTED_SUFFIXES)} "
                                f"file or a folder of them)")
    entries = sorted(p for p in path.iterdir() if not p.name.startswith((".", "_")))
    visible = [p for p in entries if p.is_file()]
    folders = [p.name for p in entries if p.is_dir()]
    unsupported = [p.name for p in visible if p.suffix.lower() not in SUPPORTED_SUFFIXES]
    # Never skipped silently: a stray file or subfolder may be data in a form we do not read.
    stray = [Violation("(folder)", f"holds file(s) of unsupported type {unsupported[:10]}",
                       f"only {', '.join(SUPPORTED_SUFFIXES)} files (names starting with '.' or '_' are ignored)")
             ] if unsupported else []
    if folders:
        stray.append(Violation("(folder)", f"holds subfolder(s) {folders[:10]}, which are not read",
                               "data files only (move the subfolders out, or name them with a leading '_')"))
    if stray:
        raise ContractError(str(path), contract, stray)
    files = [p for p in visible if p.suffix.lower() in SUPPORTED_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"{path}: folder holds no {', '.join(SUPPORTED_SUFFIXES)} files")
    tables = [_read_file(p, contract, column_map, rows) for p in files]
    # Validate the concatenation too: ids must be unique across files.
    return validate(pa.concat_tables(tables), contract, source=f"{path} ({len(files)} files)")


def _dataset_table(source: Any, split: str | None) -> tuple[pa.Table, str] | None:
    """(table, name) for a datasets.Dataset / DatasetDict; None for anything else."""
    datasets = sys.modules.get("datasets")  # already imported if ``source`` is one of its objects
    if datasets is None:
        return None
    if isinstance(source, datasets.DatasetDict):
        if split is None and len(source) == 1:
            split = next(iter(source))
        if split not in source:
            raise ValueError(f"DatasetDict: split {split!r} not found; available splits: {sorted(source)}")
        source, name = source[split], f"datasets.DatasetDict[{split!r}]"
    elif isinstance(source, datasets.Dataset):
        name = "datasets.Dataset" + (f"[{source.split}]" if source.split else "")
    elif isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise TypeError("streaming (Iterable) datasets are not supported; load the dataset without streaming")
    else:
        return None
    # with_format("arrow")[:] honours any indices mapping left by select/shuffle/filter.
    return source.with_format("arrow")[:], name


def read_table(source: Any, contract: Contract | str, column_map: dict[str, str] | None = None,
               split: str | None = None, *, source_name: str | None = None, drop_invalid: bool = False,
               max_dropped_share: float = MAX_DROPPED_SHARE, dropped: list[DroppedRow] | None = None) -> pa.Table:
    """Read ``source`` into a table validated against ``contract`` (``ContractError`` on violations).

    ``source``: a path (file or folder), a ``datasets.Dataset``/``DatasetDict`` (``split`` picks one; it is
    ignored for other sources) or a ``pyarrow.Table``. ``source_name`` overrides the name used in errors.
    ``drop_invalid``: leave out the rows that break a row-level rule (``validate``), each logged and appended to
    ``dropped``; a file where more than ``max_dropped_share`` of the rows would go is still an error.
    """
    contract = get_contract(contract)
    column_map = dict(column_map or {})
    _check_column_map(contract, column_map)
    rows = _Rows(drop_invalid, max_dropped_share, dropped)
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(source).expanduser(), contract, column_map, rows)
    if isinstance(source, pa.Table):
        table, name = source, "<pyarrow.Table>"
    else:
        found = _dataset_table(source, split)
        if found is None:
            raise TypeError(f"read_table: unsupported source type {type(source).__name__}; pass a path, a "
                            f"datasets.Dataset/DatasetDict or a pyarrow.Table")
        table, name = found
    name = source_name or name
    return rows.validate(_select(table, contract, column_map, name), contract, name)


def _offline() -> bool:
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(flag in {"1", "true", "yes", "on"} for flag in flags)


def _is_connection_failure(exc: BaseException | None) -> bool:
    """True when ``exc`` or anything in its cause chain is a network failure."""
    while exc is not None:
        if isinstance(exc, ConnectionError) or type(exc).__name__ in {
            "ConnectError", "ConnectTimeout", "OfflineModeIsEnabled", "LocalEntryNotFoundError"
        }:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_hub_split(name: str, split: str | None, config_name: str | None = None, *,
                   hint: str = "pass a local Parquet/JSONL/JSON/CSV file or folder instead") -> Any:
    """``datasets.load_dataset(name, config_name, split=split)``: the one place that decides "offline".

    Offline (HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1) or unreachable Hub and not cached ->
    ``DatasetNotCachedError`` naming the dataset and ``hint`` (what the user can do instead).
    """
    import datasets  # lazy: importing datasets costs ~1 s and most callers read local files

    try:
        return datasets.load_dataset(name, config_name, split=split)
    except Exception as exc:
        if _is_connection_failure(exc) or (_offline() and isinstance(exc, OSError)):
            where = f"{name}" + (f" (config {config_name!r})" if config_name else "") + (
                f", split {split!r}" if split else "")
            raise DatasetNotCachedError(
                f"Hub dataset {where} is not in the local datasets cache and the Hub cannot be reached "
                f"(offline={_offline()}: {type(exc).__name__}: {exc}). Download it on a connected machine, or "
                f"{hint}."
            ) from exc
        raise


def read_hub_dataset(name: str, split: str | None, contract: Contract | str,
                     column_map: dict[str, str] | None = None, config_name: str | None = None) -> pa.Table:
    """Load a Hub dataset (``load_hub_split``) and read it like ``read_table``."""
    hint = (f"pass a local Parquet/JSONL/JSON/CSV file or folder instead, e.g. read_table('data/"
            f"{name.split('/')[-1]}.parquet', {get_contract(contract).name!r})")
    loaded = load_hub_split(name, split, config_name, hint=hint)
    return read_table(loaded, contract, column_map=column_map, split=split, source_name=f"hub:{name}")


def write_table(table: pa.Table, path: str | os.PathLike, contract: Contract | str | None = None) -> Path:
    """Write ``table`` as Parquet atomically: a temporary file in the same folder, then a rename.

    With ``contract``, the table is validated (and conformed) first. Returns the final path.
    """
    path = Path(path)
    if contract is not None:
        table = validate(table, contract, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
