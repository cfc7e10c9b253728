"""Readers: every file format, column_map, datasets objects, folders, errors, atomic writes, shared data."""

import csv
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import (
    PREFERENCE_PAIRS,
    RESPONSE_POOL,
    REWARDBENCH,
    SCORES,
    ContractError,
    DatasetNotCachedError,
    contract_of,
    read_hub_dataset,
    read_table,
    write_table,
)

# Source-style rows: "question" must be mapped to "prompt"; "annotator" is an extra column to drop.
ROWS = [
    {"pair_id": "007", "question": "Say hi", "chosen": "Hi!\nHow are you?", "rejected": "No.",
     "source": "toy", "annotator": 3},
    {"pair_id": "p1", "question": "2+2?", "chosen": "4", "rejected": "5, \"surely\"", "source": "toy",
     "annotator": 1},
]
MAP = {"question": "prompt"}
EXPECTED = [
    {"pair_id": "007", "prompt": "Say hi", "chosen": "Hi!\nHow are you?", "rejected": "No.", "source": "toy"},
    {"pair_id": "p1", "prompt": "2+2?", "chosen": "4", "rejected": "5, \"surely\"", "source": "toy"},
]


def write_rows(path, rows):
    """Write ``rows`` in the format named by the file extension (json.data -> {"data": [...]})."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps({"data": rows} if "data" in path.stem else rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("name", ["pairs.parquet", "pairs.jsonl", "pairs.json", "pairs_data.json", "pairs.csv"])
def test_each_format_with_column_map(tmp_path, name):
    path = write_rows(tmp_path / name, ROWS)
    table = read_table(path, PREFERENCE_PAIRS, column_map=MAP)
    assert table.to_pylist() == EXPECTED  # CSV keeps "007" as text and the quoted newline/comma
    assert contract_of(table) == ("preference_pairs", 1)


def test_csv_and_jsonl_typed_columns(tmp_path):
    rows = [{"id": "a", "subset": "s", "p_chosen_order1": 1, "p_chosen_order2": 0.5, "p_chosen": 0.75,
             "correct": True}]
    for name in ("s.csv", "s.jsonl"):
        table = read_table(write_rows(tmp_path / name, rows), SCORES)
        assert table.to_pylist() == [{**rows[0], "p_chosen_order1": 1.0}]
        assert table.schema.field("p_chosen_order1").type == pa.float64()


def test_file_violation_names_the_file(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [{**r, "chosen": r["rejected"]} for r in ROWS])
    with pytest.raises(ContractError) as info:
        read_table(path, PREFERENCE_PAIRS, column_map=MAP)
    assert str(info.value).startswith(f"{path}: 1 violation(s)")
    assert info.value.violations[0].rows == (0, 1)


def test_mixed_types_in_json_name_file_column_and_row(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([{**EXPECTED[0]}, {**EXPECTED[1], "prompt": 5}]))
    with pytest.raises(ContractError, match=r"(?s)mixed\.json: 1 violation.*column 'prompt': wrong value type in "
                                            r"1 row\(s\); rows \[1\], values 5"):
        read_table(path, PREFERENCE_PAIRS)


def test_datasets_dataset_and_dict(tmp_path):
    dataset = datasets.Dataset.from_list(ROWS).select([1, 0])  # an indices mapping must be honoured
    assert read_table(dataset, PREFERENCE_PAIRS, column_map=MAP).to_pylist() == EXPECTED[::-1]
    splits = datasets.DatasetDict({"train": dataset, "test": dataset.select([0])})
    assert read_table(splits, "preference_pairs", column_map=MAP, split="test").to_pylist() == [EXPECTED[1]]
    with pytest.raises(ValueError, match=r"available splits: \['test', 'train'\]"):
        read_table(splits, PREFERENCE_PAIRS, column_map=MAP)
    single = datasets.DatasetDict({"train": dataset})
    assert read_table(single, PREFERENCE_PAIRS, column_map=MAP).num_rows == 2


def test_pyarrow_table_source():
    table = read_table(pa.Table.from_pylist(ROWS), PREFERENCE_PAIRS, column_map=MAP)
    assert table.to_pylist() == EXPECTED


def test_folder_is_concatenated_in_name_order(tmp_path):
    write_rows(tmp_path / "b.jsonl", ROWS[:1])
    write_rows(tmp_path / "a.parquet", ROWS[1:])
    (tmp_path / "_README.txt").write_text("not data")  # '_' and '.' names are ignored by convention
    table = read_table(tmp_path, PREFERENCE_PAIRS, column_map=MAP)
    assert table["pair_id"].to_pylist() == ["p1", "007"]
    (tmp_path / "notes.txt").write_text("maybe data")  # anything else is never skipped silently
    with pytest.raises(ValueError, match=r"unsupported type \['notes.txt'\]"):
        read_table(tmp_path, PREFERENCE_PAIRS, column_map=MAP)


def test_folder_checks_ids_across_files_and_names_bad_file(tmp_path):
    write_rows(tmp_path / "a.csv", ROWS)
    write_rows(tmp_path / "b.parquet", ROWS[:1])
    with pytest.raises(ContractError, match=r"(?s)\(2 files\): 1 violation.*duplicate id.*rows \[0, 2\]"):
        read_table(tmp_path, PREFERENCE_PAIRS, column_map=MAP)
    write_rows(tmp_path / "c.json", [{k: v for k, v in ROWS[0].items() if k != "chosen"}])
    with pytest.raises(ContractError, match=r"(?s)c\.json: 1 violation.*column 'chosen': missing column"):
        read_table(tmp_path, PREFERENCE_PAIRS, column_map=MAP)


def test_missing_and_unsupported_sources(tmp_path):
    missing = tmp_path / "nowhere.parquet"
    with pytest.raises(FileNotFoundError, match="nowhere.parquet: no such file or folder"):
        read_table(missing, PREFERENCE_PAIRS)
    odd = tmp_path / "pairs.xlsx"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.xlsx'; supported: \.parquet, \.jsonl, "
                                         r"\.json, \.csv"):
        read_table(odd, PREFERENCE_PAIRS)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir: folder holds no"):
        read_table(tmp_path / "empty_dir", PREFERENCE_PAIRS)
    with pytest.raises(TypeError, match="unsupported source type list"):
        read_table([{"a": 1}], PREFERENCE_PAIRS)


def test_bad_column_map(tmp_path):
    path = write_rows(tmp_path / "p.parquet", ROWS)
    with pytest.raises(ValueError, match=r"p\.parquet: column_map names source column\(s\) \['query'\]"):
        read_table(path, PREFERENCE_PAIRS, column_map={"query": "prompt"})
    with pytest.raises(ValueError, match=r"targets \['promt'\] are not columns of contract 'preference_pairs'"):
        read_table(path, PREFERENCE_PAIRS, column_map={"question": "promt"})


def test_write_table_is_atomic_and_round_trips(tmp_path):
    table = read_table(pa.Table.from_pylist(ROWS), PREFERENCE_PAIRS, column_map=MAP)
    path = write_table(table, tmp_path / "out" / "pairs.parquet")
    write_table(table.slice(0, 1), path)  # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == ["pairs.parquet"]  # no temp file left behind
    back = pq.read_table(path)
    assert back.to_pylist() == EXPECTED[:1] and contract_of(back) == ("preference_pairs", 1)
    with pytest.raises(ContractError):
        write_table(pa.Table.from_pylist(ROWS), tmp_path / "out" / "bad.parquet", contract=PREFERENCE_PAIRS)
    assert [p.name for p in path.parent.iterdir()] == ["pairs.parquet"]


def test_hub_dataset_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def offline_load(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'gram/absent' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline_load)
    with pytest.raises(DatasetNotCachedError, match=r"gram/absent, split 'train' is not in the local datasets "
                                                    r"cache.*pass a local Parquet/JSONL/JSON/CSV file"):
        read_hub_dataset("gram/absent", "train", PREFERENCE_PAIRS)


def test_hub_dataset_real_offline_load_fails_clearly():
    # conftest sets HF_DATASETS_OFFLINE=1 before datasets is imported, so this never touches the network.
    with pytest.raises(DatasetNotCachedError, match=r"gram-test/not-cached \(config 'c'\).*not in the local"):
        read_hub_dataset("gram-test/not-cached", "train", SCORES, config_name="c")


def test_hub_dataset_reads_what_load_dataset_returns(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(ROWS))
    assert read_hub_dataset("gram/toy", "train", PREFERENCE_PAIRS, column_map=MAP).to_pylist() == EXPECTED


def test_shared_data_files_validate(shared_data):
    bench = read_table(shared_data / "rewardbench_lite.parquet", REWARDBENCH)
    assert sorted(bench["id"].to_pylist()) == list(range(953))
    assert bench.schema.field("id").type == pa.int64()
    # The contract finds a real defect here: one 'rejected' response is a lone zero-width space.
    with pytest.raises(ContractError, match=r"column 'rejected': empty or whitespace-only .* rows \[8591\]"):
        read_table(shared_data / "preferences_train.parquet", PREFERENCE_PAIRS)
    table = pq.read_table(shared_data / "preferences_train.parquet")
    keep = pa.array([i != 8591 for i in range(table.num_rows)])
    prefs = read_table(table.filter(keep), PREFERENCE_PAIRS)
    assert prefs.num_rows == 10815 and "label_kind" not in prefs.schema.names
    assert prefs.schema.names == PREFERENCE_PAIRS.columns
    with pytest.raises(ContractError, match=r"column 'response': empty .* rows \[5303, 12339, 14545, 14779\]"):
        read_table(shared_data / "response_pool.parquet", RESPONSE_POOL)  # four zero-width-space responses
    table = pq.read_table(shared_data / "response_pool.parquet")
    pool = read_table(table.filter(pa.array([i not in (5303, 12339, 14545, 14779) for i in range(table.num_rows)])),
                      RESPONSE_POOL)
    assert pool.num_rows == 18802 and pool.schema.names == RESPONSE_POOL.columns
    assert len(set(pool["generator"].to_pylist())) == 43  # 40 AlpacaEval + 3 Arena-Hard generators


def test_drop_invalid_rows_drops_and_names_only_the_blank_rows(shared_data, caplog):
    """SourceConfig.drop_invalid_rows (on in the study presets): the shared data's zero-width rows are dropped and
    logged by file, row, id and rule; every other row is kept, and a default source still stops."""
    import logging

    from gram_core.sources import SourceConfig, read_source
    from tasks.settings import load_preset

    path = shared_data / "preferences_train.parquet"
    dropped = []
    with caplog.at_level(logging.WARNING, logger="gram.contracts"):
        prefs = read_source(SourceConfig(path=str(path), drop_invalid_rows=True), PREFERENCE_PAIRS, dropped=dropped)
    assert prefs.num_rows == 10815 and "\u200b" not in prefs["rejected"].to_pylist()
    assert [(d.row, d.rules) for d in dropped] == [(8591, ("rejected.blank",))]
    assert [r.message for r in caplog.records if "dropped row" in r.message] == [
        f"{path}: dropped row 8591 (pair_id {dropped[0].id!r}): rejected.blank (empty or whitespace-only string; "
        "expected a non-empty string (NUL, control and zero-width characters count as whitespace))"]
    with pytest.raises(ContractError, match=r"rows \[8591\]"):
        read_source(SourceConfig(path=str(path)), PREFERENCE_PAIRS)
    study = load_preset("study")
    assert study.data.preferences.drop_invalid_rows and all(p.drop_invalid_rows for p in study.data.response_pools)


# --------------------------------------------------------------------------------------------------
# drop_invalid: rows that break a row-level rule are left out (opt-in), within max_dropped_share
# --------------------------------------------------------------------------------------------------
def bench_rows(n: int, **cells) -> list[dict]:
    """n RewardBench rows (id = row); ``cells``: {"<column><row>": value} edits, e.g. rejected7="same"."""
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "chosen_model": "m", "rejected": f"bad {i}",
             "rejected_model": "n", "subset": "chat", "id": i} for i in range(n)]
    for key, value in cells.items():
        column, row = key.rstrip("0123456789"), int(key[len(key.rstrip("0123456789")):])
        rows[row][column] = value
    return rows


def dropped_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "dropped row" in r.getMessage()]


@pytest.mark.parametrize("name", ["bench.parquet", "bench.jsonl", "bench.csv"])
def test_chosen_equal_to_rejected_stops_by_default_and_is_dropped_and_logged_with_the_option(tmp_path, name, caplog):
    from data_contracts import DroppedRow

    path = write_rows(tmp_path / name, bench_rows(30, rejected7="good 7"))
    with pytest.raises(ContractError) as info:
        read_table(path, REWARDBENCH)
    assert "column 'rejected': value outside its domain in 1 row(s); rows [7]" in str(info.value)
    dropped = []
    table = read_table(path, REWARDBENCH, drop_invalid=True, dropped=dropped)
    assert table.num_rows == 29 and 7 not in table["id"].to_pylist()
    assert dropped == [DroppedRow(str(path), 7, 7, ("rejected.equals_chosen",))]
    assert dropped_lines(caplog) == [f"{path}: dropped row 7 (id 7): rejected.equals_chosen (value outside its "
                                     "domain; expected a response different from 'chosen')"]
    assert read_table(path, REWARDBENCH, drop_invalid=True).to_pylist() == table.to_pylist()  # no list: still drops


def test_a_file_past_the_share_limit_stops_even_with_the_option(tmp_path, caplog):
    from data_contracts import MAX_DROPPED_SHARE, TooManyInvalidRows

    assert MAX_DROPPED_SHARE == 0.05
    at_limit = write_rows(tmp_path / "one.jsonl", bench_rows(20, prompt3=" "))  # 1 of 20 = 5 %: not more
    assert read_table(at_limit, REWARDBENCH, drop_invalid=True).num_rows == 19
    past = write_rows(tmp_path / "two.jsonl", bench_rows(20, prompt3=" ", rejected9="good 9"))
    caplog.clear()
    dropped = []
    with pytest.raises(TooManyInvalidRows) as info:
        read_table(past, REWARDBENCH, drop_invalid=True, dropped=dropped)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ContractError)  # one line; the CLI's exit 2
    assert message.startswith(f"{past}: 2 of 20 rows (10.0 %) break row-level rules of contract 'rewardbench' v1 "
                              "(prompt.blank 1, rejected.equals_chosen 1; rows [3, 9]), more than may be dropped "
                              "(max_dropped_share 5 %)")
    assert dropped == [] and dropped_lines(caplog) == []  # nothing is dropped from a refused file
    assert read_table(past, REWARDBENCH, drop_invalid=True, max_dropped_share=0.1).num_rows == 18


def _truncated_parquet(path):
    path.write_bytes(b"PAR1 not really")


ONE_BAD_ROW = bench_rows(30, rejected5="good 5")  # droppable: the fault beside it must still stop the read


@pytest.mark.parametrize("fault, rows, column", [
    ("missing column", [{k: v for k, v in r.items() if k != "subset"} for r in ONE_BAD_ROW], "subset"),
    ("wrong type", [{**r, "id": float(r["id"]) + 0.5} for r in ONE_BAD_ROW], "id"),
    ("duplicate id", [{**r, "id": min(r["id"], 28)} for r in ONE_BAD_ROW], "id"),
    ("unreadable", None, "(file)"),
])
def test_whole_file_violations_stop_even_with_the_option(tmp_path, fault, rows, column):
    """Nothing is dropped (or logged as dropped) from a file that stops."""
    path = tmp_path / "bench.parquet"
    write_rows(path, rows) if rows else _truncated_parquet(path)
    dropped = []
    with pytest.raises(ContractError) as info:
        read_table(path, REWARDBENCH, drop_invalid=True, dropped=dropped)
    assert any(v.column == column and not v.rule for v in info.value.violations), str(info.value)
    assert dropped == []


def test_a_whole_file_fault_is_reported_before_the_share_of_bad_rows(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "subset"} for r in bench_rows(10, prompt1="", prompt2="", prompt3="")]
    with pytest.raises(ContractError) as info:
        read_table(write_rows(tmp_path / "bench.jsonl", rows), REWARDBENCH, drop_invalid=True)
    assert [(v.column, v.problem) for v in info.value.violations] == [("subset", "missing column")]


def test_every_row_level_rule_is_dropped_and_each_row_logged_once(tmp_path, caplog):
    """A lone surrogate, a value of another JSON type, a null, blank text, chosen == rejected; a row that breaks
    two rules is one dropped row (one log line naming both)."""
    rows = bench_rows(120, prompt1="\ud800", chosen2=5, subset3=None, prompt4="\u200b", rejected5="good 5")
    rows[6].update(prompt="", rejected="good 6")  # two rules, one row
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # ensure_ascii keeps the surrogate as \ud800
    dropped = []
    table = read_table(path, REWARDBENCH, drop_invalid=True, dropped=dropped)
    assert table.num_rows == 114 and table["id"].to_pylist() == [0, *range(7, 120)]
    assert {d.row: d.rules for d in dropped} == {
        1: ("prompt.lone_surrogate",), 2: ("chosen.wrong_value_type",), 3: ("subset.null",), 4: ("prompt.blank",),
        5: ("rejected.equals_chosen",), 6: ("prompt.blank", "rejected.equals_chosen")}
    lines = dropped_lines(caplog)
    assert len(lines) == 6 and "dropped row 6 (id 6): prompt.blank (" in lines[-1] and "; rejected.equals_chosen (" in lines[-1]


def test_text_that_is_not_utf8_in_parquet_is_a_row_rule(tmp_path):
    text = pa.array([b"caf\xe9"] + [f"good {i}".encode() for i in range(1, 30)], pa.binary()).view(pa.string())
    table = pa.Table.from_pylist(bench_rows(30)).set_column(1, "chosen", text)
    pq.write_table(table, tmp_path / "bench.parquet")
    with pytest.raises(ContractError, match=r"column 'chosen': invalid UTF-8 in 1 row\(s\); rows \[0\]"):
        read_table(tmp_path / "bench.parquet", REWARDBENCH)
    dropped = []
    kept = read_table(tmp_path / "bench.parquet", REWARDBENCH, drop_invalid=True, dropped=dropped)
    assert kept["id"].to_pylist() == list(range(1, 30)) and [d.rules for d in dropped] == [("chosen.invalid_utf8",)]


def test_a_folder_is_limited_file_by_file_and_names_each_file(tmp_path):
    from data_contracts import TooManyInvalidRows

    write_rows(tmp_path / "a.jsonl", bench_rows(20, rejected4="good 4"))
    write_rows(tmp_path / "b.jsonl", [{**r, "id": r["id"] + 20} for r in bench_rows(20, prompt0="")])
    dropped = []
    assert read_table(tmp_path, REWARDBENCH, drop_invalid=True, dropped=dropped).num_rows == 38
    assert [(d.source, d.row, d.id) for d in dropped] == [(str(tmp_path / "a.jsonl"), 4, 4),
                                                          (str(tmp_path / "b.jsonl"), 0, 20)]
    write_rows(tmp_path / "c.jsonl", [{**r, "id": r["id"] + 40} for r in bench_rows(10, prompt0="", prompt1="")])
    with pytest.raises(TooManyInvalidRows, match=r"c\.jsonl: 2 of 10 rows"):
        read_table(tmp_path, REWARDBENCH, drop_invalid=True)


def test_read_source_fills_ids_after_dropping_rows(tmp_path):
    """A user file without pair_id/source (filled in) and with a blank row: the blank row goes, the ids are filled."""
    from gram_core.sources import SourceConfig, read_source

    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(25)]
    rows[3]["chosen"] = "  "
    path = write_rows(tmp_path / "few.jsonl", rows)
    with pytest.raises(ContractError, match=r"rows \[3\]"):
        read_source(SourceConfig(path=str(path)), PREFERENCE_PAIRS)
    dropped = []
    table = read_source(SourceConfig(path=str(path), drop_invalid_rows=True), PREFERENCE_PAIRS, dropped=dropped)
    assert table.num_rows == 24 and "q3" not in table["prompt"].to_pylist()
    assert [(d.row, d.rules) for d in dropped] == [(3, ("chosen.blank",))]
