"""The load_source task with drop_invalid_rows: what it publishes (the rows scored), what it records (counts per
rule), and the eval-set identity the promotion gate compares."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import ContractError
from gram_core.config import JudgeConfig
from gram_core.sources import DROPPED_ROWS, SourceConfig, dropped_params
from tasks.register import eval_set_id
from tasks.settings import load_preset, state_paths
from tasks.sources import load_source
from tasks.store.artifacts import open_store, read_table_artifact


def bench(path, n: int = 30, same: tuple[int, ...] = ()) -> str:
    chosen = [f"good {i}" for i in range(n)]
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(n)], "chosen": chosen, "chosen_model": ["m"] * n,
                             "rejected": [c if i in same else f"bad {i}" for i, c in enumerate(chosen)],
                             "rejected_model": ["m"] * n, "subset": ["chat"] * n, "id": list(range(n))}), path)
    return str(path)


@pytest.fixture()
def state(tmp_path):
    return state_paths(load_preset("smoke", [f"home={tmp_path / 'home'}"]))


def load_eval(state, path: str, drop: bool = False):
    return load_source.fn("eval", SourceConfig(path=path, drop_invalid_rows=drop), "rewardbench", state)


def test_the_eval_set_identity_is_the_rows_scored(tmp_path, state):
    """A dropped row changes the eval-set identity (two runs that drop different rows are never one eval set),
    and the identity is that of the rows kept: the same as a file without the row."""
    judge = JudgeConfig()
    clean = load_eval(state, bench(tmp_path / "clean.parquet"))
    bad = bench(tmp_path / "bad.parquet", same=(7,))
    with pytest.raises(ContractError, match=r"rows \[7\]"):
        load_eval(state, bad)
    dropped = load_eval(state, bad, drop=True)
    store = open_store(state)
    rows = read_table_artifact(store, dropped)
    assert (dropped.rows, clean.rows) == (29, 30) and 7 not in rows["id"].to_pylist()
    assert eval_set_id(rows, judge) != eval_set_id(read_table_artifact(store, clean), judge)
    full = read_table_artifact(store, clean)
    assert eval_set_id(rows, judge) == eval_set_id(full.filter(pa.array([i != 7 for i in range(30)])), judge)
    other = load_eval(state, bench(tmp_path / "other.parquet", same=(8,)), drop=True)
    assert eval_set_id(read_table_artifact(store, other), judge) != eval_set_id(rows, judge)


def test_the_counts_per_rule_travel_with_the_source(tmp_path, state):
    ref = load_eval(state, bench(tmp_path / "bad.parquet", same=(7,)), drop=True)
    drops = ref.meta[DROPPED_ROWS]
    assert drops == {"rows": 1, "rules": {"rejected.equals_chosen": 1}, "first": [
        {"source": str(tmp_path / "bad.parquet"), "row": 7, "id": 7, "rules": ["rejected.equals_chosen"]}]}
    assert dropped_params("eval", drops) == {"dropped_rows.eval": 1, "dropped_rows.eval.rejected.equals_chosen": 1}
    assert DROPPED_ROWS not in load_eval(state, bench(tmp_path / "clean.parquet")).meta  # option off: no record
    assert load_eval(state, bench(tmp_path / "clean.parquet"), drop=True).meta[DROPPED_ROWS]["rows"] == 0


def test_the_run_record_reads_the_drops_of_each_source(tmp_path, state):
    from tasks.store.run_record import StageRecord, dropped_rows

    ref = load_eval(state, bench(tmp_path / "bad.parquet", same=(7,)), drop=True)
    plain = load_eval(state, bench(tmp_path / "clean.parquet"))
    records = [StageRecord("load_eval", ref, "Completed"), StageRecord("load_preferences", plain, "Completed"),
               StageRecord("finetune", None, "Completed")]
    assert dropped_rows(records) == {"eval": ref.meta[DROPPED_ROWS]}


def test_the_counts_are_mlflow_params_of_the_run_and_of_the_source_stage(tmp_path, mlflow_root):
    """record_run: dropped_rows.<role>[.<rule>] on the parent run and on the load stage's child run."""
    from mlflow import MlflowClient

    from gram_core.artifact_files import CHART_FILE, EVAL_METRICS_FILE, REPORT_FILE
    from tasks.on_mlflow import tracking
    from tasks.store.run_record import StageRecord, record_run

    state = state_paths(load_preset("smoke", [f"home={mlflow_root / 'home'}"]))
    ref = load_eval(state, bench(tmp_path / "bad.parquet", same=(7,)), drop=True)
    store = open_store(state)
    with store.staging("eval_report") as folder:
        for name in (REPORT_FILE, CHART_FILE, EVAL_METRICS_FILE):
            (folder / name).write_text("{}")
        report = store.publish("eval_report", folder, "report",
                               meta={"columns": [["trained", "GRAM"]], "trained": {"eval/accuracy": 0.5}})
    with tracking.start_pipeline_run(load_preset("smoke").mlflow, state.home, "drops") as parent:
        record_run.fn([StageRecord("load_eval", ref, "Completed")], report, None, state, parent)
    client = MlflowClient(parent.tracking_uri)
    expected = {"dropped_rows.eval": "1", "dropped_rows.eval.rejected.equals_chosen": "1"}
    assert {k: v for k, v in client.get_run(parent.run_id).data.params.items() if "dropped" in k} == expected
    (child,) = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert expected.items() <= child.data.params.items()


def test_the_study_run_gets_the_counts_as_params_too(tmp_path, mlflow_root):
    from mlflow import MlflowClient

    from tasks.on_mlflow import tracking
    from tasks.quality_study import STUDY_CHART, STUDY_FILE, STUDY_METRICS, record_study

    state = state_paths(load_preset("smoke", [f"home={mlflow_root / 'home'}"]))
    drops = load_eval(state, bench(tmp_path / "bad.parquet", same=(3,)), drop=True).meta[DROPPED_ROWS]
    store = open_store(state)
    with store.staging("study_report") as folder:
        (folder / STUDY_METRICS).write_text('{"arms": {}, "differences": {}}')
        for name in (STUDY_FILE, STUDY_CHART):
            (folder / name).write_text("-")
        report = store.publish("study_report", folder, "report")
    with tracking.start_pipeline_run(load_preset("smoke").mlflow, state.home, "study-drops") as parent:
        record_study.fn(report, {}, {}, state, parent, {"preferences": drops})
    params = MlflowClient(parent.tracking_uri).get_run(parent.run_id).data.params
    assert params == {"dropped_rows.preferences": "1", "dropped_rows.preferences.rejected.equals_chosen": "1"}
