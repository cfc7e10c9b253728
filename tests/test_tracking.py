"""tasks/on_mlflow/tracking.py against a temporary sqlite MLflow store (never ./mlruns)."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

from tasks.on_mlflow import tracking
from tasks.settings import MlflowConfig


@pytest.fixture(scope="module")
def home(mlflow_root):
    """One GRAM_HOME (sqlite store) for the module, since creating the DB costs seconds; the working
    directory stays empty for the whole module (checked by the mlflow_root fixture)."""
    return mlflow_root / "home"


@pytest.fixture(autouse=True)
def _store(home):
    """Each test starts pointed at the module's store, as the pipeline would be."""
    tracking.ensure_experiment(MlflowConfig(), home)


def test_resolve_tracking_uri_precedence(home, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(MlflowConfig(tracking_uri="http://h:5000"), home) == "http://h:5000"
    assert tracking.resolve_tracking_uri(MlflowConfig(), home) == f"sqlite:///{home.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.resolve_tracking_uri(MlflowConfig(), home) == "sqlite:////elsewhere/x.db"
    assert tracking.resolve_tracking_uri(MlflowConfig(tracking_uri="http://h:5000"), home) == "http://h:5000"


def test_uri_we_set_is_not_mistaken_for_the_users(tmp_path, home, monkeypatch):
    """mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI; a second GRAM_HOME must still get its own DB."""
    for key, value in tracking._ENV_STATE.items():
        monkeypatch.setitem(tracking._ENV_STATE, key, value)  # restored after the test
    first = f"sqlite:///{home.resolve()}/mlflow.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == first  # written by mlflow.set_tracking_uri in ensure_experiment
    assert tracking.resolve_tracking_uri(MlflowConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////users/choice.db")  # the user's own choice...
    assert tracking.resolve_tracking_uri(MlflowConfig(), tmp_path) == "sqlite:////users/choice.db"
    tracking.use_tracking_uri("sqlite:////other/place.db")  # ...survives our pointing MLflow elsewhere
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////other/place.db"  # (which overwrites the env)
    assert tracking.resolve_tracking_uri(MlflowConfig(), tmp_path) == "sqlite:////users/choice.db"


def test_urls_only_for_http():
    assert tracking.run_url("sqlite:////x.db", "1", "abc") is None
    assert tracking.run_url("http://127.0.0.1:5000/", "1", "abc") == "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    assert tracking.model_version_url("https://m.example", "gram", "3") == "https://m.example/#/models/gram/versions/3"


def test_flatten_nests_with_dots_and_expands_dataclasses():
    flat = tracking.flatten({"train": {"lr": 1e-5, "sched": {"warmup": 0.1}}, "cfg": MlflowConfig(), "empty": {}})
    assert flat["train.lr"] == 1e-5
    assert flat["train.sched.warmup"] == 0.1
    assert flat["cfg.model_name"] == "gram-reward-model"
    assert flat["empty"] == {}


def test_parent_and_child_runs_params_metrics_artifacts(home, tmp_path):
    cfg = MlflowConfig(experiment="exp-test")
    params = {"model": {"source": "tiny", "lora_r": 0}, "train": {"learning_rate": 2e-5, "targets": ["q", "k"]}}
    history = [{"step": 1, "loss": 0.9, "lr": 1e-5}, {"step": 2, "loss": 0.7, "lr": 2e-5},
               {"step": 3, "loss": 0.5, "lr": None, "eval/acc": 0.75}]
    note = tmp_path / "report.md"
    note.write_text("# report\n")
    with tracking.start_pipeline_run(cfg, home, "pipeline-1", params=params, tags={"gram.code": "abc"}) as parent:
        with tracking.stage_run("train_judge", {"stage": {"steps": 3}}) as child:
            n_points = tracking.log_metric_history(history)
            artifact_uri = tracking.log_artifact_file(note, artifact_path="reports")
        logged = tracking.log_eval_metrics({"rewardbench": {"overall": 0.61, "chat": 0.8}})

    assert n_points == 6  # 3 losses + 2 lrs (None skipped) + 1 eval/acc
    client = MlflowClient(parent.tracking_uri)
    p_run, c_run = client.get_run(parent.run_id), client.get_run(child.run_id)
    assert p_run.info.status == c_run.info.status == "FINISHED"
    assert c_run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert c_run.data.tags["gram.stage"] == "train_judge"
    assert p_run.data.tags["gram.code"] == "abc"
    assert p_run.data.params == {"model.source": "tiny", "model.lora_r": "0", "train.learning_rate": "2e-05",
                                 "train.targets": '["q", "k"]'}
    assert c_run.data.params == {"stage.steps": "3"}
    loss = client.get_metric_history(child.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == [(1, 0.9), (2, 0.7), (3, 0.5)]
    assert [m.step for m in client.get_metric_history(child.run_id, "train/lr")] == [1, 2]
    assert client.get_metric_history(child.run_id, "eval/acc")[0].step == 3  # a split prefix is kept
    assert logged == {"rewardbench/overall": 0.61, "rewardbench/chat": 0.8}
    assert p_run.data.metrics == {"rewardbench/overall": 0.61, "rewardbench/chat": 0.8}
    # Artifacts land under GRAM_HOME/mlartifacts, nothing in the working directory.
    experiment = client.get_experiment(parent.experiment_id)
    assert experiment.artifact_location == (home.resolve() / "mlartifacts").as_uri()
    assert artifact_uri.endswith("/reports/report.md")
    assert (Path(client.get_run(child.run_id).info.artifact_uri.removeprefix("file://")) / "reports" /
            "report.md").read_text() == "# report\n"
    assert parent.url is None and parent.tracking_uri.startswith("sqlite:///")


def test_history_count_is_exact(home):
    with tracking.start_pipeline_run(MlflowConfig(), home, "count"):
        assert tracking.log_metric_history([{"step": 0, "loss": 1.0, "grad_norm": 2.0, "skipped": True}]) == 3
        # 1500 points forces more than one log_batch call (MLflow caps a batch at 1000 metrics).
        rows = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(1500)]
        assert tracking.log_metric_history(rows, prefix="pretrain") == 1500
        rid = tracking._run_id(None, "test")
    assert MlflowClient().get_metric_history(rid, "train/skipped")[0].value == 1.0  # bools log as 0/1
    values = MlflowClient().get_metric_history(rid, "pretrain/loss")
    assert len(values) == 1500
    assert math.isclose(min(values, key=lambda m: m.step).value, 1.0)


def test_stage_run_from_another_thread_nests_under_the_handle(home):
    """Prefect runs tasks in worker threads, where MLflow's thread-local active run is not visible."""
    result: dict[str, str] = {}

    def task(parent: tracking.RunHandle) -> None:
        with tracking.stage_run("sample", {"k": 4}, parent=parent) as child:
            tracking.log_eval_metrics({"sample/responses": 12})
            result["child"] = child.run_id

    with tracking.start_pipeline_run(MlflowConfig(), home, "threads") as parent:
        worker = threading.Thread(target=task, args=(parent,))
        worker.start()
        worker.join()
    run = MlflowClient(parent.tracking_uri).get_run(result["child"])
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.metrics == {"sample/responses": 12.0}
    assert run.data.params == {"k": "4"}


def test_long_params_are_truncated_and_long_keys_stay_unique(home):
    long_key = "x" * (MAX_ENTITY_KEY_LENGTH + 20)
    with tracking.start_pipeline_run(MlflowConfig(), home, "limits") as parent:
        logged = tracking.log_params_flat({"blob": "a" * 7000, long_key: 1, long_key + "y": 2})
    params = MlflowClient(parent.tracking_uri).get_run(parent.run_id).data.params
    assert len(params["blob"]) == MAX_PARAM_VAL_LENGTH
    assert params["blob"].endswith(tracking.TRUNCATION_MARK) and params["blob"].startswith("aaaa")
    long_keys = [k for k in logged if k.startswith("xxx")]
    assert len(long_keys) == 2 and all(len(k) == MAX_ENTITY_KEY_LENGTH for k in long_keys)
    assert sorted(params[k] for k in long_keys) == ["1", "2"]


def test_errors_name_the_problem(home):
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        with tracking.stage_run("orphan"):
            pass
    with pytest.raises(RuntimeError, match="log_eval_metrics: no run_id"):
        tracking.log_eval_metrics({"a": 1.0})
    with tracking.start_pipeline_run(MlflowConfig(), home, "errors"):
        with pytest.raises(ValueError, match="history row 1 key 'loss'.*'nan!'"):
            tracking.log_metric_history([{"step": 0, "loss": 1.0}, {"step": 1, "loss": "nan!"}])
        with pytest.raises(ValueError, match="row 0 has no 'step' key"):
            tracking.log_metric_history([{"loss": 1.0}])
        with pytest.raises(FileNotFoundError, match="missing.txt"):
            tracking.log_artifact_file(home / "missing.txt")


def test_failed_body_marks_the_run_failed(home):
    with pytest.raises(ZeroDivisionError):
        with tracking.start_pipeline_run(MlflowConfig(), home, "boom") as parent:
            1 / 0  # noqa: B018
    assert MlflowClient(parent.tracking_uri).get_run(parent.run_id).info.status == "FAILED"


def test_deleted_experiment_is_restored(home, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, experiment_id = tracking.ensure_experiment(MlflowConfig(experiment="gone"), home)
    MlflowClient(uri).delete_experiment(experiment_id)
    _, again = tracking.ensure_experiment(MlflowConfig(experiment="gone"), home)
    assert again == experiment_id
    assert MlflowClient(uri).get_experiment(experiment_id).lifecycle_stage == "active"


def test_text_artifacts_are_uploaded_redacted_and_the_local_files_kept(home, tmp_path):
    """A report or summary that names a credential (a store or tracking URI) reaches the tracking store redacted,
    as a single file and inside a folder; binary files and the local originals are left as they were."""
    secret = "pw-Zq81xTextArtifact"
    report = tmp_path / "report.md"
    report.write_text(f"store: https://gram:{secret}@store.example/p\n")
    folder = tmp_path / "summary"
    folder.mkdir()
    (folder / "summary.json").write_text(f'{{"uri": "s3://b/p?token={secret}"}}')
    (folder / "weights.bin").write_bytes(b"\x00" + secret.encode())
    with tracking.start_pipeline_run(MlflowConfig(experiment="exp-redact"), home, "redact") as run:
        tracking.log_artifact_file(report, artifact_path="reports")
        tracking.log_artifact_file(folder)
    root = Path(MlflowClient(run.tracking_uri).get_run(run.run_id).info.artifact_uri.removeprefix("file://"))
    uploaded = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    texts = {k: v for k, v in uploaded.items() if not k.endswith(".bin")}
    assert set(texts) == {"reports/report.md", "summary.json"}  # a folder's files land at the root
    assert all(secret.encode() not in v and b"***" in v for v in texts.values()), texts
    assert uploaded["weights.bin"] == b"\x00" + secret.encode()  # bytes are not text: never rewritten
    assert secret in report.read_text() and secret in (folder / "summary.json").read_text()
