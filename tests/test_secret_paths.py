"""The secret paths the canary run does not cross (issue 25): `gram study --out`, `gram adapt --data URL?token=`,
MLflow run names, artifact metadata, flows started from a deployment, secrets in other environment variables,
and the tracking URI MLflow exports to child processes. Each test fails with its guard removed
(docs/reliability.md lists the mutations)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows import cli
from tasks.on_mlflow import tracking
from tasks.redaction import redact, remember_environment, secret_env_names
from tasks.settings import MlflowConfig

CANARY = "cAnAry-Secret-7Hq2"


def test_secrets_in_other_environment_variables_are_learnt_up_front():
    env = {"HF_TOKEN": CANARY + "hf", "AWS_SECRET_ACCESS_KEY": CANARY + "aws", "PWD": "/home/someone/work",
           "RAY_AUTH_MODE": "disabled", "SSH_AUTH_SOCK": "/tmp/ssh-agent.sock", "GRAM_HOME": "/srv/gram-state",
           "DATABASE_URL": f"postgresql://gram:{CANARY}db@db.example/x"}
    assert secret_env_names(env) == ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN"]
    remember_environment(env)
    text = f"token {CANARY}hf, key {CANARY}aws, db {CANARY}db, in /home/someone/work and /srv/gram-state"
    assert CANARY not in redact(text)
    assert "/home/someone/work" in redact(text) and "/srv/gram-state" in redact(text)


def test_the_exported_tracking_uri_carries_no_password(monkeypatch, tmp_path):
    """MLflow exports the tracking URI to $MLFLOW_TRACKING_URI for child processes (Ray workers), whose output
    nobody redacts: the password goes to MLflow's basic-auth variables instead."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    import mlflow

    before = mlflow.get_tracking_uri()
    try:
        tracking.use_tracking_uri(f"http://gram:p%40ss%2F{CANARY}@127.0.0.1:5999/")
        assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999/"
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "gram"
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == f"p@ss/{CANARY}"
        assert mlflow.get_tracking_uri().endswith(f"{CANARY}@127.0.0.1:5999/")  # this process keeps the real one
        assert tracking.resolve_tracking_uri(MlflowConfig(), tmp_path).startswith("sqlite:///")  # not the user's
    finally:
        mlflow.set_tracking_uri(before)


def test_mlflow_run_names_are_redacted(mlflow_root):
    home = mlflow_root / "home"
    tracking.ensure_experiment(MlflowConfig(), home)
    name = f"gram-https://gram:{CANARY}@cfg.example/preset.yaml"
    with tracking.start_pipeline_run(MlflowConfig(experiment="exp-names"), home, name) as parent, \
            tracking.stage_run(f"stage?token={CANARY}", parent=parent) as child:
        pass
    client = MlflowClient(parent.tracking_uri)
    names = [client.get_run(r.run_id).info.run_name for r in (parent, child)]
    assert all(CANARY not in n and "***" in n for n in names), names


def test_artifact_metadata_names_the_source_redacted(tmp_path):
    """A source path or URL with a credential (`...?token=`) is described in the artifact's manifest, which
    Prefect's cached result, MLflow's `gram.*` tags and the run summary copy."""
    from gram_core.sources import SourceConfig
    from tasks.settings import StatePaths
    from tasks.sources import load_source

    data = tmp_path / f"data?token={CANARY}"  # a legal folder name that reads like a signed URL
    data.mkdir()
    row = {"pair_id": "p-0", "prompt": "Which?", "chosen": "yes", "rejected": "no", "source": "s"}
    (data / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    paths = StatePaths(home=tmp_path, artifact_store=str(tmp_path / "store"), prefect_results=tmp_path / "r",
                       ray_storage=str(tmp_path / "ray"))
    ref = load_source.fn("preferences", SourceConfig(path=str(data)), "preference_pairs", paths)
    manifest = (Path(ref.uri) / "_artifact.json").read_text()
    assert CANARY not in ref.meta["source"] and CANARY not in manifest and "token=***" in manifest


def _fake_study_summary(tmp_path: Path) -> dict:
    (tmp_path / "quality.md").write_text("| arm | accuracy |\n")
    (tmp_path / "quality.png").write_bytes(b"png")
    return {"report": str(tmp_path / "quality.md"), "chart": str(tmp_path / "quality.png"), "mlflow_run": "r",
            "tracking_uri": "sqlite:///x"}


def test_study_out_writes_the_command_line_redacted(tmp_path, monkeypatch):
    import flows.study

    monkeypatch.setenv("GRAM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(flows.study, "gram_study", lambda **kwargs: _fake_study_summary(tmp_path))
    argv = ["study", "--preset", "smoke", "--set", f"data.eval.name=host=db password={CANARY}",
            "--out", str(tmp_path / "study.md")]
    monkeypatch.setattr(sys, "argv", ["gram", *argv])
    assert cli.main(argv) == 0
    text = (tmp_path / "study.md").read_text()
    assert "Command: `gram study --preset smoke" in text and "password=***" in text and CANARY not in text


def test_adapt_data_reaches_the_flow_redacted_and_the_run_real(tmp_path, monkeypatch):
    """What `gram adapt` hands the Prefect flow (stored as its parameters) is redacted; the flow body reads the
    real value back (``reveal``), as it does the --set values."""
    import flows.adapt
    from flows.parameters import reveal

    monkeypatch.setenv("GRAM_HOME", str(tmp_path / "home"))
    data = f"{tmp_path}/pairs.jsonl?token={CANARY}"
    seen = {}

    def fake_adapt(**kwargs):
        seen.update(kwargs, real_data=reveal(kwargs["data"]))
        return {}

    monkeypatch.setattr(flows.adapt, "adapt", fake_adapt)
    monkeypatch.setattr(cli, "format_summary", lambda summary: "")
    assert cli.main(["adapt", "--preset", "smoke", "--model", str(tmp_path / "model"), "--data", data]) == 0
    assert seen["data"] == f"{tmp_path}/pairs.jsonl?token=***" and seen["real_data"] == data
    assert reveal(seen["data"]) == seen["data"]  # outside the command nothing maps back


@pytest.mark.parametrize("flow_name", ["gram_pipeline", "adapt", "gram_study"])
def test_a_flow_started_from_a_deployment_redacts_its_console_and_logs(flow_name, monkeypatch, capsys):
    """A deployment's run starts the flow function in a Prefect worker, not through `gram`: the flow body itself
    learns the environment's secrets and redacts what it prints and logs."""
    import flows.adapt
    import flows.pipeline
    import flows.study

    secret = f"{CANARY}-{flow_name}"
    monkeypatch.setenv("HF_TOKEN", secret)

    def body(*args, **kwargs):
        print(f"print {secret}")
        logging.getLogger("gram.test").warning("log %s", secret)
        return {}

    module, fn, inner = {"gram_pipeline": (flows.pipeline, flows.pipeline.gram_pipeline, "_tracked"),
                         "adapt": (flows.adapt, flows.adapt.adapt, "_adapt"),
                         "gram_study": (flows.study, flows.study.gram_study, "_study")}[flow_name]
    monkeypatch.setattr(module, inner, body)
    if flow_name == "adapt":
        monkeypatch.setattr(module, "adapt_config", lambda *a: None)
    fn.fn(preset="smoke")
    out = capsys.readouterr()
    assert "print ***" in out.out and secret not in out.out + out.err
