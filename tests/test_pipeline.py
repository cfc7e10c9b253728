"""End to end: the `smoke` pipeline under the Prefect test harness, a real local Ray runtime, a temporary
MLflow SQLite database and a temporary GRAM_HOME.

One module-scoped sequence of runs (each Ray Train fit costs ~35 s, so they are shared):
  run 1   fresh            -> every stage computes, version 1 registered, champion (no champion yet)
  run 2   unchanged        -> every stage Cached; register (never cached) finds version 1 by content
  refresh unchanged, --refresh -> every stage computes again, bit-identical: the same artifact hashes, the
                              same eval numbers, version 1 found by content (the determinism check)
  run 3   finetune changed -> only finetune / evaluate / eval_report recompute, and register; a huge
                              promotion margin keeps the champion (gate outcome "kept"), version 2
  run 4   margin back to 0 -> only register runs; same model content, so version 2 again (no duplicate);
                              the champion's score was lowered by hand, so version 2 becomes champion
  other   a new tracking URI (drill 4) -> every stage Cached, and the new registry gets its version 1
  retry   registration fails once with a connection error (drill 8) -> Prefect retries, same version
  down    an unreachable tracking server (drill 8) -> the run fails at the start with a clear message
  adapt   the champion fine-tuned on a few labeled pairs (a JSONL without ids) -> version 3
The Bradley-Terry baseline is switched on (SMOKE) with its own learning rate, so stage 2's learning-rate change
in run 3 leaves it cached; it takes stage 2's 3 steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from toy_data import few_labels

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["eval.limit=16", "baseline.enabled=true", "baseline.learning_rate=1.0e-3"]
FINETUNE_CHANGE = ["finetune.learning_rate=5.0e-3"]
STAGE_TASKS = ("build_pairs", "pretrain", "finetune", "bradley_terry", "evaluate", "evaluate_base", "evaluate_bt",
               "eval_report", "register")
SOURCE_TASKS = ("load_prompts", "load_pool0", "load_preferences", "load_eval")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Temp GRAM_HOME (artifacts, MLflow sqlite, Prefect results), one local Ray runtime, Prefect harness."""
    import ray
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("gram-home")
    ray_tmp = tempfile.mkdtemp(prefix="gr-", dir="/tmp")  # socket paths must stay short
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAM_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        # One runtime for the module: fit() uses it and leaves it running (it only stops what it starts).
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024, _temp_dir=ray_tmp)
        try:
            with prefect_test_harness():
                yield home
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def run_pipeline(overrides, **kwargs):
    """(summary, {task run name: state name} read back from the Prefect API) of one pipeline run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import gram_pipeline

    state = gram_pipeline(preset="smoke", overrides=list(overrides), return_state=True, **kwargs)
    summary = state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return summary, {r.name: r.state.name for r in runs}


def mlflow_client(home):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}")


def stage_folders(home) -> dict[str, set[str]]:
    """Each stage's published artifact folders (named by content hash)."""
    return {p.name: {m.parent.name for m in p.glob("*/_artifact.json")} for p in (home / "artifacts").iterdir()}


def model_artifacts(home) -> set[str]:
    return {str(p.parent) for stage in ("pretrain", "finetune") for p in (home / "artifacts" / stage).glob("*/_artifact.json")}


@pytest.fixture(scope="module")
def run1(env):
    return run_pipeline(SMOKE)


@pytest.fixture(scope="module")
def run2(run1):
    return run_pipeline(SMOKE)


@pytest.fixture(scope="module")
def refreshed(run2, env):
    before = stage_folders(env)
    return (*run_pipeline(SMOKE, refresh=True), before)


@pytest.fixture(scope="module")
def run3(refreshed):
    return run_pipeline([*SMOKE, *FINETUNE_CHANGE, "mlflow.promotion_margin=10.0"])


@pytest.fixture(scope="module")
def run4(run3, env):
    summary, _ = run3
    name = summary["registered"]["name"]
    client = mlflow_client(env)
    champion = client.get_model_version_by_alias(name, "champion")
    client.set_model_version_tag(name, champion.version, "eval/accuracy", "-1.0")  # any candidate beats it
    return run_pipeline([*SMOKE, *FINETUNE_CHANGE, "mlflow.promotion_margin=0.0"])


@pytest.fixture(scope="module")
def other_registry(run4, env):
    uri = f"sqlite:///{env / 'other' / 'mlflow.db'}"
    (env / "other").mkdir()
    return run_pipeline([*SMOKE, *FINETUNE_CHANGE, f"mlflow.tracking_uri={uri}"]), uri


@pytest.fixture(scope="module")
def retried(other_registry, env):
    import flows.pipeline
    from tasks.on_mlflow import model_registry

    calls = []
    real = model_registry.log_and_register

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer (injected)")
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_registry, "log_and_register", flaky)
        mp.setattr(flows.pipeline, "register", flows.pipeline.register.with_options(retry_delay_seconds=0))
        return run_pipeline([*SMOKE, *FINETUNE_CHANGE]), len(calls)


@pytest.fixture(scope="module")
def adapted(retried, run4, env, tmp_path_factory):
    from flows.adapt import adapt

    name = run4[0]["registered"]["name"]
    data = tmp_path_factory.mktemp("adapt") / "few_labels.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in few_labels(12)))
    return adapt(model=f"models:/{name}@champion", data=str(data), preset="smoke", overrides=SMOKE), name


def heldout_rows(env: Path) -> int:
    """Held-out rows in the loaded eval source (all of them are scored, whatever eval.limit says)."""
    import pyarrow.parquet as pq

    from gram_core.starter import HELDOUT_SUBSETS

    (meta,) = [m for m in (json.loads(p.read_text()) for p in (env / "artifacts" / "sources").glob("*/_artifact.json"))
               if m["meta"]["role"] == "eval" and m["meta"]["source"] == "starter (limit 24)"]
    subsets = pq.read_table(Path(meta["uri"]) / "table.parquet", columns=["subset"])["subset"].to_pylist()
    return sum(s in HELDOUT_SUBSETS for s in subsets)


def test_first_run_computes_every_stage_and_registers(run1, env):
    summary, states = run1
    assert {states[name] for name in (*SOURCE_TASKS, *STAGE_TASKS)} == {"Completed"}
    assert summary["stages"] == {name: "Completed" for name in (*SOURCE_TASKS, *STAGE_TASKS)}
    reg = summary["registered"]
    assert reg["version"] == "1" and sorted(reg["aliases"]) == ["candidate", "champion"]
    assert reg["promotion"]["decision"] == "promoted" and reg["promotion"]["reason"] == "no champion yet"
    # Content-addressed outputs: folder name = first 16 hex of the content hash, manifest last.
    store = env / "artifacts"
    assert summary["artifact_store"] == str(store)
    for stage in ("build_pairs", "pretrain", "finetune", "bradley_terry", "evaluate", "eval_report"):
        folders = [p.parent for p in (store / stage).glob("*/_artifact.json")]
        assert folders, stage
        for folder in folders:
            assert json.loads((folder / "_artifact.json").read_text())["sha256"].startswith(folder.name)
    finetuned = next((store / "finetune").glob("*/_artifact.json")).parent
    assert (finetuned / "config.json").exists() and (finetuned / "metrics.jsonl").exists()
    report = Path(summary["report"]).read_text()
    assert "| | zero-shot | BT | GRAM |" in report and "BT: a scalar reward model, scored once per pair" in report
    assert Path(summary["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["columns"] == {"base": "zero-shot", "bt": "BT", "trained": "GRAM"}
    rows = {r["metric"]: r for r in summary["eval"]}
    # eval.limit=16 samples the in-distribution subsets; the held-out ones are scored in full, beside them.
    assert summary["eval_rows"] == 16 + heldout_rows(env)
    for column in ("base", "bt", "trained"):
        assert 0.0 <= rows["accuracy (all pairs)"][column] <= 1.0
    assert 0.0 <= rows["position consistency"]["trained"] <= 1.0
    assert 0.0 <= rows["position consistency"]["base"] <= 1.0
    assert rows["position consistency"]["bt"] == "n/a (scalar)"


def test_bt_baseline_is_trained_from_the_base_model_with_stage_2_steps(run1, env):
    import pyarrow.parquet as pq

    from gram_core.models import tiny_model_dir
    from gram_core.scorers import folder_kind

    store = env / "artifacts"
    (bt,) = [json.loads(p.read_text()) for p in (store / "bradley_terry").glob("*/_artifact.json")]
    (ft,) = [json.loads(p.read_text()) for p in (store / "finetune").glob("*/_artifact.json")]
    assert bt["meta"]["steps"] == ft["meta"]["steps"] == 3  # smoke: finetune.max_steps = 3
    assert bt["meta"]["data"] == ft["meta"]["data"]  # the same preference pairs
    assert ft["meta"]["start"].startswith("model:")  # stage 2 starts from stage 1 ...
    assert bt["meta"]["start"] == str(tiny_model_dir(0))  # ... the baseline from the base model
    assert folder_kind(bt["uri"]) == "bradley_terry"
    (bt_eval,) = [m for m in (json.loads(p.read_text()) for p in (store / "evaluate").glob("*/_artifact.json"))
                  if m["meta"]["label"] == "bt"]
    scores = pq.read_table(Path(bt_eval["uri"]) / "table.parquet")
    assert scores.num_rows == 16 + heldout_rows(env)
    p = scores["p_chosen"].to_pylist()
    assert scores["p_chosen_order1"].to_pylist() == scores["p_chosen_order2"].to_pylist() == p
    assert scores["correct"].to_pylist() == [x > 0.5 for x in p]
    assert bt_eval["meta"]["metrics"]["eval/orders_scored"] == 1.0
    assert "rewardbench/position_consistency" not in bt_eval["meta"]["metrics"]


def test_mlflow_parent_run_has_a_child_run_per_stage(run1, env):
    summary, _ = run1
    client = mlflow_client(env)
    parent = client.get_run(summary["mlflow_run"])
    assert parent.data.params["code_version"] and parent.data.params["config.finetune.learning_rate"] == "0.001"
    assert "eval/accuracy" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {c.data.tags["gram.stage"]: c for c in children}
    assert set(STAGE_TASKS) <= set(by_stage)
    history = client.get_metric_history(by_stage["finetune"].info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]  # smoke: finetune.max_steps = 3, one point per step
    # Logged live by Ray's rank 0 as each step happened (not in one batch after the stage).
    assert by_stage["finetune"].data.tags["gram.live"] == "true" and len({m.timestamp for m in history}) == 3
    assert by_stage["finetune"].data.tags["gram.sha256"]
    assert "rewardbench/position_consistency" in by_stage["eval_report"].data.metrics
    assert "bt/eval/accuracy" in parent.data.metrics and "zero_shot/eval/accuracy" in parent.data.metrics
    assert "bt/rewardbench/position_consistency" not in parent.data.metrics
    bt_history = client.get_metric_history(by_stage["bradley_terry"].info.run_id, "train/loss")
    assert [m.step for m in bt_history] == [1, 2, 3]  # as many optimizer steps as stage 2
    assert "eval/accuracy" in by_stage["evaluate_bt"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "chart.png"} <= artifacts


def test_training_stages_show_progress_in_prefect(run1, env):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    with get_client(sync_client=True) as client:
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
    stages = {a.description.split(":")[0]: a.data for a in progress}
    assert stages == {"pretrain": 100.0, "finetune": 100.0, "bradley_terry": 100.0}  # from the workers, up to the last step


def test_second_run_is_served_from_cache(run2, env):
    summary, states = run2
    assert {states[name] for name in (*SOURCE_TASKS, *STAGE_TASKS) if name != "register"} == {"Cached"}
    assert states["register"] == "Completed"  # never cached: it looks the model up by content instead
    assert summary["registered"]["version"] == "1" and summary["registered"]["reused"]  # nothing new
    versions = mlflow_client(env).search_model_versions(f"name = '{summary['registered']['name']}'")
    assert len(versions) == 1


def test_refresh_recomputes_every_stage_with_identical_results(run1, refreshed, env):
    """Determinism: `gram run --refresh` on the same machine recomputes every stage (sources, sampling-free
    pair building, both trainings, the three evaluations) and gets the same bytes: each stage's content hash,
    every eval number, and so the registered version found by content."""
    first, _ = run1
    summary, states, before = refreshed
    assert {states[name] for name in (*SOURCE_TASKS, *STAGE_TASKS)} == {"Completed"}
    assert summary["eval"] == first["eval"]
    assert summary["registered"]["version"] == "1" and summary["registered"]["reused"]
    assert stage_folders(env) == before  # every recomputed artifact has a content hash seen before


def test_changed_finetune_config_reruns_only_downstream(run3, env):
    summary, states = run3
    recomputed = {"finetune", "evaluate", "eval_report", "register"}
    assert {n for n in (*SOURCE_TASKS, *STAGE_TASKS) if states[n] == "Completed"} == recomputed
    assert not summary["registered"]["reused"]
    assert {n for n in (*SOURCE_TASKS, *STAGE_TASKS) if states[n] == "Cached"} == \
        set(SOURCE_TASKS) | {"build_pairs", "pretrain", "bradley_terry", "evaluate_base", "evaluate_bt"}
    reg = summary["registered"]
    assert reg["version"] == "2" and reg["aliases"] == ["candidate"]
    assert reg["promotion"]["decision"] == "kept" and reg["promotion"]["champion_version"] == "1"
    client = mlflow_client(env)
    assert str(client.get_model_version_by_alias(reg["name"], "champion").version) == "1"
    tags = client.get_model_version(reg["name"], "2").tags
    assert tags["promotion/decision"] == "kept" and tags["code_version"] and tags["data.load_preferences"]


def test_gate_moves_champion_when_the_candidate_beats_it(run4, env):
    """Also drill 4: only the margin changed, so the same model content reuses version 2 (no duplicate)."""
    summary, states = run4
    assert {n for n in (*SOURCE_TASKS, *STAGE_TASKS) if states[n] == "Completed"} == {"register"}
    reg = summary["registered"]
    assert reg["version"] == "2" and reg["reused"] and sorted(reg["aliases"]) == ["candidate", "champion"]
    assert reg["promotion"]["decision"] == "promoted" and reg["promotion"]["champion_score"] == -1.0
    client = mlflow_client(env)
    assert len(client.search_model_versions(f"name = '{reg['name']}'")) == 2
    assert str(client.get_model_version_by_alias(reg["name"], "champion").version) == "2"
    assert client.get_model_version(reg["name"], "1").tags["promotion/superseded_by"] == "2"


def test_drill_new_tracking_uri_gets_its_registration(other_registry, env):
    """Drill 4: pointing at another registry is no cache hit for registration."""
    (summary, states), uri = other_registry
    assert {states[n] for n in (*SOURCE_TASKS, *STAGE_TASKS) if n != "register"} == {"Cached"}
    reg = summary["registered"]
    assert states["register"] == "Completed" and reg["tracking_uri"] == uri
    assert reg["version"] == "1" and not reg["reused"] and reg["promotion"]["reason"] == "no champion yet"
    from mlflow import MlflowClient

    assert len(MlflowClient(uri).search_model_versions(f"name = '{reg['name']}'")) == 1
    assert len(mlflow_client(env).search_model_versions(f"name = '{reg['name']}'")) == 2  # the old one untouched


def test_drill_registration_retries_a_transient_failure(retried, env):
    """Drill 8: the registry call fails once with a connection error; Prefect retries; same version."""
    (summary, states), calls = retried
    assert calls == 2 and states["register"] == "Completed"
    assert summary["registered"]["version"] == "2" and summary["registered"]["reused"]


def test_drill_unreachable_tracking_server_fails_before_training(retried, env):
    """Drill 8: nothing runs when the tracking server does not answer; the message says what to do."""
    from tasks.on_mlflow.tracking import TrackingServerUnreachable

    before = set((env / "artifacts").rglob("_artifact.json"))
    with pytest.raises(TrackingServerUnreachable, match=r"http://127\.0\.0\.1:9 is unreachable.*nothing was run"):
        run_pipeline([*SMOKE, "finetune.learning_rate=7.0e-3", "mlflow.tracking_uri=http://127.0.0.1:9"])
    assert set((env / "artifacts").rglob("_artifact.json")) == before


def test_pyfunc_judge_loads_by_alias_and_matches_the_core_judge(run4, env):
    import numpy as np
    import pandas as pd

    from gram_core.config import JudgeConfig
    from gram_core.scorers import open_scorer
    from tasks.on_mlflow.model_registry import download_registered_model, load_registered_judge

    name = run4[0]["registered"]["name"]
    uri = f"sqlite:///{env / 'mlflow.db'}"
    frame = pd.DataFrame({"prompt": ["What is 2+2?", "Say hi."], "response_a": ["4", "Hello!"],
                          "response_b": ["5", "Go away."]})
    predicted = load_registered_judge(f"models:/{name}@champion", tracking_uri=uri).predict(frame)
    assert list(predicted.columns) == ["p_a_better", "p_order1", "p_order2", "consistent"]
    np.testing.assert_allclose(predicted["p_a_better"], (predicted["p_order1"] + predicted["p_order2"]) / 2)
    folder, resolved = download_registered_model(f"models:/{name}@champion", uri, env / "dl")
    assert resolved == f"models:/{name}/2"
    core = open_scorer(str(folder), JudgeConfig()).preference(list(frame["prompt"]), list(frame["response_a"]),
                                                           list(frame["response_b"]))
    np.testing.assert_allclose(predicted["p_a_better"], core.p, atol=1e-5)


@pytest.mark.parametrize("case", ["missing_column", "empty_response", "missing_file"])
def test_bad_input_fails_before_training_and_leaves_no_artifact(case, run1, env, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prefs.parquet"
    rows = {"pair_id": ["a", "b", "c"], "prompt": ["p1", "p2", "p3"], "chosen": ["x", "y", "z"],
            "rejected": ["u", "v", "w"], "source": ["t"] * 3}
    if case == "missing_column":
        del rows["rejected"]
        expected = ["prefs.parquet", "'rejected'", "missing column"]
    elif case == "empty_response":
        rows["chosen"][1] = "   "
        expected = ["prefs.parquet", "'chosen'", "rows [1]"]
    else:
        path = tmp_path / "nowhere.parquet"
        expected = ["nowhere.parquet", "no such file"]
    if case != "missing_file":
        pq.write_table(pa.table(rows), path)
    before = model_artifacts(env)
    sources_before = set((env / "artifacts" / "sources").iterdir())
    with pytest.raises(Exception) as err:  # noqa: B017 - the type differs per case; the message is checked
        run_pipeline([*SMOKE, f"data.preferences.path={path}", "finetune.max_steps=2"])
    for fragment in expected:
        assert fragment in str(err.value)
    assert model_artifacts(env) == before
    assert set((env / "artifacts" / "sources").iterdir()) == sources_before


def test_shared_data_evaluate_and_build_pairs(shared_data, env, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from prefect import flow

    from data_contracts import ContractError, read_table
    from gram_core.config import JudgeConfig, ModelConfig
    from gram_core.pairs import PairingConfig
    from gram_core.sampling import SamplingConfig
    from gram_core.sources import SourceConfig
    from tasks.evaluate import evaluate
    from tasks.settings import load_preset, state_paths
    from tasks.sources import load_source
    from tasks.stage1_pairs import build_stage1_pairs
    from tasks.store.artifacts import ArtifactStore, read_table_artifact
    from tasks.store.caching import bind

    paths = state_paths(load_preset("smoke"))
    # The shared pool holds four responses that are a lone zero-width space: a contract error (issue 16); the
    # stages below run on the pool without them.
    defects = (5303, 12339, 14545, 14779)
    with pytest.raises(ContractError, match=r"column 'response': empty .* rows \[5303, 12339, 14545, 14779\]"):
        read_table(shared_data / "response_pool.parquet", "response_pool")
    raw = pq.read_table(shared_data / "response_pool.parquet")
    pool_file = tmp_path / "response_pool.parquet"
    pq.write_table(raw.filter(pa.array([i not in defects for i in range(raw.num_rows)])), pool_file)

    @flow
    def real_data():
        load = bind(load_source, paths.prefect_results)
        lite = load("eval", SourceConfig(path=str(shared_data / "rewardbench_lite.parquet")), "rewardbench",
                    paths, limit=30, seed=1, stratify="subset")
        pool = load("pool", SourceConfig(path=str(pool_file), limit=400, seed=1),
                    "response_pool", paths)
        scores = bind(evaluate, paths.prefect_results)(ModelConfig(source="tiny"), lite, JudgeConfig(max_length=768),
                                                      "base", paths)
        pairs = bind(build_stage1_pairs, paths.prefect_results)(None, [pool], [], SamplingConfig(models=("tiny",)),
                                                               PairingConfig(max_pairs_per_prompt=2), paths)
        return lite, scores, pairs

    lite, scores, pairs = real_data()
    store = ArtifactStore(paths.artifact_store)
    subsets = set(read_table_artifact(store, lite)["subset"].to_pylist())
    assert lite.rows == 30 and len(subsets) == 10  # stratified: every subset of the file is represented
    table = read_table_artifact(store, scores)
    assert table.num_rows == 30 and table.schema.metadata[b"gram.contract"] == b"scores"
    metrics = scores.meta["metrics"]
    assert {"rewardbench/chat", "rewardbench/chat_hard", "rewardbench/safety"} <= set(metrics)
    assert "rewardbench/reasoning" not in metrics and metrics["rewardbench/rows"] == 30.0
    built = read_table_artifact(store, pairs)
    assert 0 < built.num_rows <= 2 * pairs.meta["prompts"]
    assert all(a != b for a, b in zip(built["response_a"].to_pylist(), built["response_b"].to_pylist(), strict=True))
    assert os.path.exists(pairs.file("pool.parquet"))


def test_adapt_fine_tunes_the_registered_champion(adapted, env):
    import pyarrow.parquet as pq

    summary, name = adapted
    assert summary["stages"]["fetch_registered_model"] == "Completed"
    assert summary["stages"]["finetune"] == "Completed" and summary["stages"]["load_eval"] == "Cached"
    reg = summary["registered"]
    assert reg["version"] == "3" and "candidate" in reg["aliases"]
    client = mlflow_client(env)
    tags = client.get_model_version(name, "3").tags
    assert tags["adapted_from"] == f"models:/{name}/2"
    promo = reg["promotion"]
    assert promo["champion_version"] == "2"
    assert (promo["decision"] == "promoted") == (promo["candidate_score"] > promo["champion_score"])
    report = Path(summary["report"]).read_text()
    assert f"models:/{name}@champion (before)" in report
    # The few labels were read without ids or source: both were filled in.
    prefs = next(r for r in (env / "artifacts" / "sources").glob("*/_artifact.json")
                 if json.loads(r.read_text())["meta"]["source"].endswith("few_labels.jsonl"))
    table = pq.read_table(prefs.parent / "table.parquet")
    assert table.num_rows == 12 and table["pair_id"][0].as_py() == "few_labels-000000"
    assert set(table["source"].to_pylist()) == {"few_labels"}


def test_study_smoke(env, tmp_path):
    """The quality study's flow on the tiny model: five arms scored on one eval set, one MLflow run each
    (stages it shares with the pipeline runs above come from their cache)."""
    from flows.study import gram_study
    from gram_core.study_report import ARMS

    summary = gram_study(preset="smoke", overrides=SMOKE)
    assert set(summary["arms"]) == set(ARMS)
    for arm, values in summary["arms"].items():
        assert values["overall"] is None  # starter subsets belong to no official RewardBench section
        assert 0.0 <= values["accuracy"] <= 1.0 and 0.0 <= values["ece"] <= 0.5
        assert (values["position_consistency"] is None) == (arm == "bt")
    report = Path(summary["report"]).read_text()
    assert all(label in report for label in ARMS.values()) and "n/a (scalar)" in report
    assert "Paired differences in points, GRAM minus each arm" in report and "| GRAM − Bradley-Terry" in report
    assert "| stage 1 (pre-training) | 2 |" in report and "| generative judge, no stage 1 (ε = 0.1) | 5 |" in report
    assert "| *cue: prefer longer* |" in report and "| GRAM − cue: prefer longer |" in report
    # bench/study_render.py renders the same report from the state folder alone (no training, no scoring)
    from tasks.settings import load_preset

    again = tmp_path / "rendered.md"
    subprocess.run([sys.executable, "-m", "bench.study_render", "--home", os.environ["GRAM_HOME"],
                    "--out", str(again), "--eval-name", load_preset("smoke", SMOKE).data.eval.describe()],
                   check=True, cwd=REPO)
    assert again.read_text().endswith(report) and again.with_suffix(".png").stat().st_size > 1000
    assert Path(summary["chart"]).stat().st_size > 1000
    assert {"finetune_no_stage1", "finetune_gram", "finetune_gram_eps0", "bradley_terry"} <= set(summary["stages"])
    client = mlflow_client(env)
    experiment = client.get_experiment_by_name("gram-smoke")
    children = client.search_runs([experiment.experiment_id], "tags.`gram.stage` LIKE 'arm:%'")
    names = {r.data.tags["gram.stage"] for r in children}
    assert names == {f"arm:{arm}" for arm in ARMS}
    assert all("study/accuracy" in r.data.metrics for r in children)
    parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
    assert {"study/gram_minus_bt/all_pairs", "study/gram_minus_judge_no_stage1/all_pairs"} <= set(parent.data.metrics)
