"""tasks/on_mlflow/model_registry.py: pyfunc judge, registration, aliases and the promotion gate on a temporary sqlite store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from registry_versions import alias_version, mlflow_uri, new_version

from tasks.on_mlflow import model_registry, tracking
from tasks.settings import MlflowConfig

ROWS = pd.DataFrame({
    "prompt": ["What is 2+2?", "Name a colour.", "Say hi."],
    "response_a": ["4", "Blue, like the sky on a clear day.", "Hello there!"],
    "response_b": ["5", "Seven.", "hi"],
})


@pytest.fixture(scope="module")
def model_dir():
    from gram_core.models import tiny_model_dir

    return tiny_model_dir(seed=0)


@pytest.fixture(scope="module")
def variants(model_dir, tmp_path_factory):
    """Model folders with distinct contents (the tiny model plus a marker file): variants(i) -> folder."""
    import shutil

    root = tmp_path_factory.mktemp("variants")

    def make(index: int) -> Path:
        folder = root / f"v{index}"
        if not folder.exists():
            shutil.copytree(model_dir, folder)
            (folder / "variant.txt").write_text(str(index))
        return folder

    return make


def _register(store: Path, model_dir: Path, cfg: MlflowConfig, score: float, eval_set: str = "rb-lite-v1"):
    with tracking.start_pipeline_run(cfg, store / "home", f"register-{score}"):
        with tracking.stage_run("register"):
            return model_registry.log_and_register(model_dir, cfg, {cfg.promotion_metric: score, "judge/consistency": 0.9},
                                             {"config_hash": "c0ffee", "data/train_sha256": "d00d"}, eval_set)


def test_register_versions_aliases_and_gate(mlflow_store, variants):
    cfg = MlflowConfig(model_name="judge-seq", promotion_margin=0.05)
    client = MlflowClient()

    v1 = _register(mlflow_store, variants(1), cfg, 0.60)
    assert (v1.version, v1.promotion.decision, v1.promotion.reason) == ("1", "promoted", "no champion yet")
    assert alias_version(client, "judge-seq", "champion") == "1"
    assert alias_version(client, "judge-seq", "candidate") == "1"
    tags = client.get_model_version("judge-seq", "1").tags
    assert tags["config_hash"] == "c0ffee" and tags["data/train_sha256"] == "d00d"
    assert tags["eval_set_id"] == "rb-lite-v1"
    assert float(tags["rewardbench/overall"]) == 0.60 and float(tags["judge/consistency"]) == 0.9
    assert tags["promotion/decision"] == "promoted" and tags["promotion/champion_version"] == "None"
    assert v1.model_uri == "models:/judge-seq/1" and v1.logged_model_uri.startswith("models:/m-")
    assert client.get_model_version("judge-seq", "1").run_id == v1.run_id

    v2 = _register(mlflow_store, variants(2), cfg, 0.55)
    assert (v2.version, v2.promotion.decision) == ("2", "kept")
    assert alias_version(client, "judge-seq", "champion") == "1"
    assert alias_version(client, "judge-seq", "candidate") == "2"
    tags = client.get_model_version("judge-seq", "2").tags
    assert tags["promotion/decision"] == "kept"
    assert float(tags["promotion/candidate_score"]) == 0.55 and float(tags["promotion/champion_score"]) == 0.60
    assert tags["promotion/champion_version"] == "1"
    assert "0.55 <= champion v1 0.6 + margin 0.05" in tags["promotion/reason"]

    v3 = _register(mlflow_store, variants(3), cfg, 0.70)  # 0.70 > 0.60 + 0.05
    assert v3.promotion.promoted and v3.promotion.champion_version == "1"
    assert alias_version(client, "judge-seq", "champion") == "3"
    assert client.get_model_version("judge-seq", "1").tags["promotion/superseded_by"] == "3"


def test_gate_margin_is_strict_and_eval_sets_must_match(mlflow_store):
    client, name, metric = MlflowClient(), "judge-gate", "rewardbench/overall"
    champion = new_version(client, name, 0.70, "set-a", metric)
    assert model_registry.promote_if_better(client, name, champion, metric, 0.05, "set-a").promoted

    within = new_version(client, name, 0.74, "set-a", metric)  # 0.74 <= 0.70 + 0.05: not enough
    decision = model_registry.promote_if_better(client, name, within, metric, 0.05, "set-a")
    assert (decision.decision, decision.champion_score, decision.candidate_score) == ("kept", 0.70, 0.74)

    other_set = new_version(client, name, 0.99, "set-b", metric)  # far better, but on another eval set
    decision = model_registry.promote_if_better(client, name, other_set, metric, 0.05, "set-b")
    assert decision.decision == "kept" and decision.champion_eval_set_id == "set-a"
    assert "not comparable" in decision.reason and "'set-b'" in decision.reason
    assert alias_version(client, name, "champion") == champion
    assert client.get_model_version(name, other_set).tags["promotion/decision"] == "kept"

    again = model_registry.promote_if_better(client, name, champion, metric, 0.05, "set-a")
    assert again.decision == "kept" and "already the champion" in again.reason

    nan = new_version(client, name, float("nan"), "set-a", metric)
    assert "not finite" in model_registry.promote_if_better(client, name, nan, metric, 0.0, "set-a").reason

    better = new_version(client, name, 0.76, "set-a", metric)
    assert model_registry.promote_if_better(client, name, better, metric, 0.05, "set-a").promoted
    assert alias_version(client, name, "champion") == better

    untagged = str(client.create_model_version(name, source="/nonexistent/bare-model").version)
    with pytest.raises(ValueError, match=f"version {untagged} has no tag 'rewardbench/overall'"):
        model_registry.promote_if_better(client, name, untagged, metric, 0.0, "set-a")


def test_champion_loads_by_alias_and_matches_the_judge(mlflow_store, model_dir):
    import mlflow.pyfunc

    from gram_core.config import JudgeConfig
    from gram_core.judging import Judge
    from gram_core.models import load_model, load_tokenizer

    cfg = MlflowConfig(model_name="judge-load")
    _register(mlflow_store, model_dir, cfg, 0.5)
    judge_pyfunc = mlflow.pyfunc.load_model("models:/judge-load@champion")
    out = judge_pyfunc.predict(ROWS)
    assert list(out.columns) == ["p_a_better", "p_order1", "p_order2", "consistent"] and len(out) == 3
    for column in ("p_a_better", "p_order1", "p_order2"):
        assert ((out[column] >= 0) & (out[column] <= 1)).all()
    np.testing.assert_allclose(out["p_a_better"], (out["p_order1"] + out["p_order2"]) / 2, rtol=0, atol=1e-12)
    assert out["consistent"].tolist() == ((out["p_order1"] > 0.5) == (out["p_order2"] > 0.5)).tolist()

    from gram_core.config import ModelConfig

    model, _ = load_model(ModelConfig(source=str(model_dir)), source=str(model_dir))
    direct = Judge(model, load_tokenizer(str(model_dir)), JudgeConfig()).preference(
        ROWS["prompt"].tolist(), ROWS["response_a"].tolist(), ROWS["response_b"].tolist())
    np.testing.assert_allclose(out["p_order1"], direct.p_order1, atol=1e-6)
    np.testing.assert_allclose(out["p_order2"], direct.p_order2, atol=1e-6)
    np.testing.assert_allclose(out["p_a_better"], direct.p, atol=1e-6)
    assert not np.allclose(direct.p, 0.5, atol=1e-9)  # a random tiny model still has opinions

    swapped = judge_pyfunc.predict(ROWS.rename(columns={"response_a": "response_b", "response_b": "response_a"}))
    np.testing.assert_allclose(swapped["p_a_better"], 1 - out["p_a_better"], atol=1e-9)

    loaded = model_registry.load_registered_judge("models:/judge-load@champion")
    np.testing.assert_allclose(loaded.predict(ROWS)["p_a_better"], out["p_a_better"], atol=1e-6)


def test_predict_rejects_bad_input():
    from tasks.on_mlflow.judge_pyfunc import JudgeInputError, check_input

    with pytest.raises(JudgeInputError, match=r"missing column\(s\) \['response_b'\]"):
        check_input(ROWS.drop(columns=["response_b"]))
    with pytest.raises(JudgeInputError, match=r"column 'prompt' rows \[1\]"):
        check_input(ROWS.assign(prompt=["ok", None, "ok"]))
    with pytest.raises(JudgeInputError, match="expected a table"):
        check_input(ROWS.to_dict())


def test_rest_errors_carry_the_reason(mlflow_store, model_dir):
    """The scoring server (in process) answers 400 with the judge's own message, no server paths."""
    import json

    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    cfg = MlflowConfig(model_name="judge-rest")
    _register(mlflow_store, model_dir, cfg, 0.5)
    pyfunc_model = mlflow.pyfunc.load_model("models:/judge-rest@champion")
    assert pyfunc_model.input_example is not None and list(pyfunc_model.input_example.columns) == [
        "prompt", "response_a", "response_b"]
    flavor = pyfunc_model.metadata.flavors["python_function"]  # models-from-code: the file, not a pickle
    assert flavor["model_code_path"].endswith("judge_pyfunc.py") and "python_model" not in flavor
    client = TestClient(scoring_server.init(pyfunc_model))

    def invoke(rows):
        body = {"dataframe_split": {"columns": ["prompt", "response_a", "response_b"], "data": rows}}
        return client.post("/invocations", content=json.dumps(body), headers={"Content-Type": "application/json"})

    ok = invoke([["What is 2+2?", "4", "5"]])
    assert ok.status_code == 200 and set(ok.json()["predictions"][0]) == {"p_a_better", "p_order1", "p_order2",
                                                                          "consistent"}
    for rows, reason in (([["What is 2+2?", None, "5"]], "column 'response_a' rows [0] are not strings"),
                         ([["q", "4", "5"], ["q", "4", 7]], "column 'response_b' rows [1] are not strings")):
        answer = invoke(rows)
        assert answer.status_code == 400, answer.text
        assert reason in answer.json()["message"]
        assert "stack_trace" not in answer.json() and "/site-packages/" not in answer.text


def test_log_and_register_checks_its_inputs(mlflow_store, model_dir, tmp_path):
    cfg = MlflowConfig(model_name="judge-errors")
    with pytest.raises(ValueError, match="promotion metric 'rewardbench/overall'.*\\['acc'\\]"):
        model_registry.log_and_register(model_dir, cfg, {"acc": 0.5}, None, "set-a")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_registry.log_and_register(tmp_path, cfg, {"rewardbench/overall": 0.5}, None, "set-a")
    with pytest.raises(ValueError, match="eval_set_id"):
        model_registry.log_and_register(model_dir, cfg, {"rewardbench/overall": 0.5}, None, "")
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        model_registry.log_and_register(model_dir, cfg, {"rewardbench/overall": 0.5}, None, "set-a")


def test_pip_requirements_are_exact_pins():
    pins = dict(p.split("==") for p in model_registry.pip_requirements())
    assert set(pins) == set(model_registry.RUNTIME_PACKAGES)
    assert all(v and "+" not in v for v in pins.values())


def test_registered_model_dir_downloads_each_version_once(mlflow_store, model_dir, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    from tasks.store.artifacts import folder_sha256

    cfg, client, uri = MlflowConfig(model_name="judge-cache"), MlflowClient(), mlflow_uri()
    version = _register(mlflow_store, model_dir, cfg, 0.5).version
    sha = folder_sha256(model_dir)
    client.set_model_version_tag("judge-cache", version, "model_sha256", sha)
    cache = tmp_path / "registered"
    folder, resolved = model_registry.registered_model_dir("models:/judge-cache@champion", uri, cache)
    assert resolved == f"models:/judge-cache/{version}" and folder == cache / sha[:16]
    assert folder_sha256(folder) == sha and (folder / "config.json").is_file()

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    with monkeypatch.context() as patch:
        patch.setattr(model_registry, "download_registered_model", no_download)
        assert model_registry.registered_model_dir(f"models:/judge-cache/{version}", uri, cache)[0] == folder

    (folder / "config.json").write_text("{}")  # a damaged cache entry is fetched again
    assert model_registry.registered_model_dir("models:/judge-cache@champion", uri, cache)[0] == folder
    assert folder_sha256(folder) == sha

    client.set_model_version_tag("judge-cache", version, "model_sha256", "0" * 64)
    with pytest.raises(RuntimeError, match="model_sha256 tag says 0000"):
        model_registry.registered_model_dir(f"models:/judge-cache/{version}", uri, tmp_path / "other")

    with pytest.raises(model_registry.ModelNotFoundError, match="has no alias 'best'.*aliases: candidate, champion"):
        model_registry.registered_model_dir("models:/judge-cache@best", uri, cache)
    with pytest.raises(model_registry.ModelNotFoundError, match="no registered model 'nope'.*judge-cache"):
        model_registry.registered_model_dir("models:/nope@champion", uri, cache)
    assert not issubclass(model_registry.ModelNotFoundError, MlflowException)


def test_drill_same_content_registers_once_and_the_gate_reruns(mlflow_store, variants):
    """Drill 4 (registry level): the same model folder registered again (e.g. only the margin changed)
    reuses its version; its eval tags and the gate decision follow the latest call."""
    name = "judge-idem"
    first = _register(mlflow_store, variants(10), MlflowConfig(model_name=name, promotion_margin=0.0), 0.60)
    champion = _register(mlflow_store, variants(11), MlflowConfig(model_name=name, promotion_margin=0.0), 0.80)
    assert (first.version, champion.version, champion.promotion.decision) == ("1", "2", "promoted")
    again = _register(mlflow_store, variants(10), MlflowConfig(model_name=name, promotion_margin=0.5), 0.60)
    assert again.reused and again.version == "1" and again.promotion.decision == "kept"
    assert "margin 0.5" in again.promotion.reason
    client = MlflowClient()
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert alias_version(client, name, "candidate") == "1" and alias_version(client, name, "champion") == "2"
    assert client.get_model_version(name, "1").tags["promotion/margin"] == "0.5"


def test_drill_cold_cache_downloads_once_and_gc_waits_for_a_download(mlflow_store, model_dir, tmp_path, monkeypatch):
    """Two `gram judge` calls on a cold registered-model cache (threads here, the lock also spans processes)
    download once and get the same whole folder; `gram gc` started during a download waits for it instead of
    removing its `.download-*` folder."""
    import threading

    from tasks.settings import load_preset
    from tasks.store.artifacts import folder_sha256
    from tasks.store.state import collect_garbage

    cfg, uri = MlflowConfig(model_name="judge-cold"), mlflow_uri()
    _register(mlflow_store, model_dir, cfg, 0.5)
    home = tmp_path / "home"
    cache = home / "registered"
    real, calls, downloading, gc_done = model_registry.download_registered_model, [], threading.Event(), threading.Event()

    def slow_download(*args, **kwargs):
        calls.append(1)
        fetched = real(*args, **kwargs)
        downloading.set()
        # Files fetched, not yet moved into place: the window for a second caller, or gc (which, holding the
        # cache lock as it must, cannot finish before this download does: then the wait times out).
        gc_done.wait(5)
        return fetched

    monkeypatch.setattr(model_registry, "download_registered_model", slow_download)
    results, errors = [], []

    def judge():
        try:
            results.append(model_registry.registered_model_dir("models:/judge-cold@champion", uri, cache)[0])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=judge) for _ in range(2)]
    for thread in threads:
        thread.start()
    assert downloading.wait(60)
    collect_garbage(load_preset("smoke", [f"home={home}"]).resolved(), apply=True)  # gc during the download
    gc_done.set()
    for thread in threads:
        thread.join(120)
    assert errors == [] and len(calls) == 1 and results[0] == results[1]
    assert folder_sha256(results[0]) == folder_sha256(model_dir)
    assert not [p for p in cache.iterdir() if p.name.startswith(".download-")]
