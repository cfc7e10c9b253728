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


def test_drop_blank_rows_drops_and_names_only_the_blank_rows(shared_data, caplog):
    """SourceConfig.drop_blank_rows (on in the study presets): the shared data's zero-width rows are dropped and
    logged by file, column and row; every other row is kept, and a default source still stops."""
    import logging

    from gram_core.sources import SourceConfig, read_source
    from tasks.settings import load_preset

    path = shared_data / "preferences_train.parquet"
    with caplog.at_level(logging.WARNING, logger="gram.contracts"):
        prefs = read_source(SourceConfig(path=str(path), drop_blank_rows=True), PREFERENCE_PAIRS)
    assert prefs.num_rows == 10815 and "\u200b" not in prefs["rejected"].to_pylist()
    assert any(str(path) in r.message and "'rejected'" in r.message and "[8591]" in r.message for r in caplog.records)
    with pytest.raises(ContractError, match=r"rows \[8591\]"):
        read_source(SourceConfig(path=str(path)), PREFERENCE_PAIRS)
    study = load_preset("study")
    assert study.data.preferences.drop_blank_rows and all(p.drop_blank_rows for p in study.data.response_pools)
