"""Drill 1 (canary): a secret in every URI, override and environment form never leaves the process: not on
a successful `gram run`, `gram adapt` and `gram study`, a failing run, or a run of the nightly deployment
started by a Prefect worker (docs/reliability.md, table row 8)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from leak_scan import files_holding
from toy_data import few_labels

from tasks.on_mlflow.tracking import redact

ROOT = Path(__file__).resolve().parents[1]
CANARY = "Canary7f3eb9"
PASSWORD = f"p@ss/{CANARY}"  # '@' and '/' in a password: percent-encoded in a URI
SECRET_FORMS = {
    "password with @ and /": f"postgresql://gram:p@ss/{CANARY}@db.invalid:5432/mlflow",
    "token as user": f"https://{CANARY}@mlflow.invalid",
    "query token": f"https://data.invalid/e.parquet?region=eu&token={CANARY}",
    "presigned signature": f"s3://bucket/store?X-Amz-Signature={CANARY}&region=eu",
    "fragment token": f"https://data.invalid/e.parquet#access_token={CANARY}",
    "libpq password": f"host=db.invalid user=gram password={CANARY} dbname=mlflow",
    "libpq quoted password": f"host=db.invalid password='a b {CANARY}'",
}


@pytest.mark.parametrize("form", SECRET_FORMS)
def test_every_secret_form_is_redacted(form):
    out = redact(SECRET_FORMS[form])
    assert CANARY not in out and "***" in out


def test_a_percent_encoded_password_is_known_decoded_too():
    from urllib.parse import quote

    secret = "Hidden9q2xk"  # not the canary, which other tests teach redact() first
    assert redact(f"http://gram:{quote(f'p@ss/{secret}', safe='')}@127.0.0.1:5000") == "http://***@127.0.0.1:5000"
    assert secret not in redact(f"a library quoting the decoded password p@ss/{secret}")


def test_console_writes_are_redacted_inside_the_block(capsys):
    from tasks.redaction import console_redacted

    with console_redacted():
        sys.stdout.write("View run r at: http://gram:Zq8pw77xy@127.0.0.1:5000/#/experiments/1\n")
        print("token=Zq8pw77xy", file=sys.stderr)
    print("after the block: written as-is")
    out, err = capsys.readouterr()
    assert "Zq8pw77xy" not in out + err and "http://***@127.0.0.1:5000/#/experiments/1" in out
    assert "after the block" in out and not getattr(sys.stdout, "gram_redacts", False)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _server(name: str, args: list[str], root: Path, health: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """``python -m <args...> --port PORT`` on 127.0.0.1 (a free port), its console in ``root/server.log``, ready
    once ``http://127.0.0.1:PORT<health>`` answers; stopped by its pid at the end (its children stop with it)."""
    import requests

    port = _free_port()
    root.mkdir(exist_ok=True)
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", *args, "--host", "127.0.0.1", "--port", str(port)], cwd=root,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"{name} exited: {log.read_text()[-2000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{port}{health}", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"{name} not up after 300 s: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started, nothing else
            proc.wait(30)


def _mlflow_server(root: Path) -> contextlib.AbstractContextManager[int]:
    """A real MLflow tracking server (sqlite backend, proxied artifacts and its console log under ``root``)."""
    return _server("mlflow server", ["mlflow", "server", "--workers", "1", "--backend-store-uri",
                                     f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                                     str(root / "artifacts")], root, "/health")


def _prefect_server(home: Path, env: dict[str, str]) -> contextlib.AbstractContextManager[int]:
    """A real Prefect server as docs/operations.md §2 starts it, its database and console log under ``home``
    (no UI; no scheduler, so the nightly deployment's cron creates no run of its own)."""
    return _server("prefect server", ["prefect", "server", "start", "--no-ui", "--no-scheduler"], home,
                   "/api/health", env={**env, "PREFECT_HOME": str(home)})


def _deployment_run(port: int, env: dict[str, str], console: Path) -> None:
    """One run of the nightly deployment of prefect.yaml on the Prefect server at ``port``, as docs/operations.md
    §2 starts it: the work pool, `prefect deploy`, `prefect deployment run ... --param preset=smoke`, and a
    process worker (`--run-once`) that runs it in a child process and exits. Every command's console is
    appended to ``console``."""
    env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PWD": str(ROOT)}
    with open(console, "a") as out:
        for step in (["work-pool", "create", "gram-pool", "--type", "process", "--overwrite"],
                     ["--no-prompt", "deploy", "--name", "nightly"],
                     ["deployment", "run", "gram-pipeline/nightly", "--param", "preset=smoke"],
                     ["worker", "start", "--pool", "gram-pool", "--run-once"]):
            out.write(f"$ prefect {' '.join(step)}\n")
            out.flush()
            done = subprocess.run([sys.executable, "-m", "prefect", *step], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=1500)
            assert done.returncode == 0, (step, console.read_text()[-3000:])


def _gram(args: list[str], env: dict[str, str]) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds) of one real `gram` process."""
    began = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1500)
    return out.returncode, out.stdout, out.stderr, time.monotonic() - began


def _prefect_runs(db: Path) -> tuple[str, list[str], list[str]]:
    """(every flow run's parameters as JSON text, the messages of failed flow-run states, each flow run's state
    type) from Prefect's database."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con:
        parameters = json.dumps([row[0] for row in con.execute("SELECT parameters FROM flow_run")])
        failed = [row[0] or "" for row in con.execute("SELECT message FROM flow_run_state WHERE type = 'FAILED'")]
        states = [row[0] for row in con.execute("SELECT state_type FROM flow_run")]
    return parameters, failed, states


def test_drill_canary_secret_reaches_no_state_folder_database_or_console(tmp_path):
    """Drill 1 (canary), on real `gram` processes against a real local MLflow server whose URI carries the canary
    in its password (with '@' and '/', percent-encoded), and `HF_TOKEN=hf_<canary>` in every environment:
      1. `gram run --preset smoke` with that URI as `--set mlflow.tracking_uri=...` and libpq strings holding the
         canary in two more `--set` values: succeeds, registers version 1 on that server;
      2. `gram adapt` of that champion with the URI in $MLFLOW_TRACKING_URI, `--data` in a folder named
         `labels?token=<canary>` and the libpq `--set`: succeeds, registers the adapted judge;
      3. `gram study --preset smoke --out` with the URI in $MLFLOW_TRACKING_URI: succeeds;
      4. `gram run` with data URLs carrying it (password, `?token=`, `#access_token=`): fails in its first task
         (the readers take local paths only), so the secret crosses the failure path (state messages, error line);
      5. the nightly deployment (prefect.yaml) on a real Prefect server, run by a process worker whose
         environment holds the URI and HF_TOKEN: completes, its pipeline run logged on that server.
    Then the state folder, the server's database, artifact root and log, both Prefect databases and the server's
    log, Ray's session folder, the study report and every console hold the canary 0 times (also as UTF-16 and
    as the base64 of an Authorization header)."""
    import base64
    import shutil
    from urllib.parse import quote

    from mlflow import MlflowClient

    home, prefect_home, server_root = tmp_path / "home", tmp_path / "prefect", tmp_path / "mlflow-server"
    deploy_home = tmp_path / "prefect-server"  # the Prefect server's own database and log
    ray_tmp = Path(f"/tmp/gc-{os.getpid()}")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_API_URL")}
    env.update(GRAM_HOME=str(home), PREFECT_HOME=str(prefect_home), RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(ROOT),
               GRAM_LOCK_DIR=str(tmp_path / "locks"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="900",
               HF_TOKEN=f"hf_{CANARY}")  # a credential in another environment variable (unused offline)
    study_out = tmp_path / "study-out" / "study.md"  # `gram study --out` writes its command line there
    study_out.parent.mkdir()
    labels = tmp_path / f"labels?token={CANARY}" / "few.jsonl"  # a legal folder name that reads like a signed URL
    labels.parent.mkdir()
    labels.write_text("\n".join(json.dumps(row) for row in few_labels(12)))
    libpq = [f"--set=data.eval.name={SECRET_FORMS['libpq password']}",  # a hub config name: unused for a path
             f"--set=data.preferences.name={SECRET_FORMS['libpq quoted password']}"]
    data_urls = [f"--set=data.eval.path={SECRET_FORMS['query token']}",
                 f"--set=data.preferences.path={SECRET_FORMS['fragment token']}",
                 f"--set=data.prompts.path=https://gram:{PASSWORD}@data.invalid/p.jsonl"]
    deployment_console = tmp_path / "deployment.out"
    console, codes, seconds = {}, {}, {}
    try:
        with _mlflow_server(server_root) as port:
            uri = f"http://gram:{quote(PASSWORD, safe='')}@127.0.0.1:{port}"
            for name, args, extra in (
                    ("run", ["run", "--preset", "smoke", f"--set=mlflow.tracking_uri={uri}", *libpq], {}),
                    ("adapt", ["adapt", "--preset", "smoke", "--model", "models:/gram-reward-model-smoke@champion",
                               "--data", str(labels), *libpq], {"MLFLOW_TRACKING_URI": uri}),
                    ("study", ["study", "--preset", "smoke", *libpq, "--out", str(study_out)],
                     {"MLFLOW_TRACKING_URI": uri}),
                    ("bad-data", ["run", "--preset", "smoke", *data_urls], {"MLFLOW_TRACKING_URI": uri})):
                codes[name], out, err, seconds[name] = _gram(args, {**env, **extra})
                (tmp_path / f"{name}.out").write_text(out)
                (tmp_path / f"{name}.err").write_text(err)
                console[f"{name} stdout"], console[f"{name} stderr"] = out, err
                assert codes[name] == (2 if name == "bad-data" else 0), (name, err[-3000:])
            began = time.monotonic()
            with _prefect_server(deploy_home, env) as prefect_port:
                _deployment_run(prefect_port, {**env, "MLFLOW_TRACKING_URI": uri}, deployment_console)
            seconds["deployment"] = time.monotonic() - began
            console["deployment"] = deployment_console.read_text()
            client = MlflowClient(uri)
            versions = client.search_model_versions("name = 'gram-reward-model-smoke'")
            experiment = client.get_experiment_by_name("gram-smoke")
            runs = client.search_runs([experiment.experiment_id], "tags.`gram.stage` = 'finetune'")
            parents = client.search_runs([experiment.experiment_id], "tags.`gram.preset` = 'smoke'")
        needles = (CANARY.encode(), CANARY.encode("utf-16-le"),
                   base64.b64encode(f"gram:{PASSWORD}".encode()))  # as an Authorization header carries it
        hits = [*files_holding(home, needles), *files_holding(server_root, needles),
                *files_holding(prefect_home, needles), *files_holding(deploy_home, needles),
                *files_holding(ray_tmp, needles),  # Ray's session folder: its logs, spilled objects
                *files_holding(study_out.parent, needles),  # the study report with its command line
                *[f"{name}: {line}" for name, text in console.items() for line in text.splitlines() if CANARY in line]]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(seconds)  # shown with -s, or when the drill fails
    assert hits == [], hits  # the canary count
    # The secret-bearing URI was really used: the run registered on that server, adapt registered its judge
    # there, the study and the deployment's pipeline run logged there too.
    assert "1" in {v.version for v in versions} and any("adapted_from" in v.tags for v in versions), versions
    assert runs and runs[0].data.tags["gram.artifact"]  # the stage's artifact tag was written
    redacted_uri = f"http://***@127.0.0.1:{port}"
    params = [r.data.params for r in parents]
    assert any(p.get("config.mlflow.tracking_uri") == redacted_uri for p in params), params
    assert any(p.get("config.data.eval.name") == "host=db.invalid user=gram password=*** dbname=mlflow" for p in params)
    flows = [r.data.tags.get("gram.flow") for r in parents if r.info.status == "FINISHED"]
    assert {"study", "adapt"} <= set(flows) and flows.count(None) == 2, flows  # `gram run` and the deployment's
    assert "password=***" in study_out.read_text()  # the --set values are in the report's command, redacted
    assert f"at {redacted_uri}" in console["run stdout"]  # the summary names the server, redacted
    assert "Registered: gram-reward-model-smoke" in console["adapt stdout"], console["adapt stdout"][-2000:]
    assert f"at {redacted_uri}" in console["adapt stdout"]
    # ... and the overrides reached Prefect redacted, and the bad data URLs failed in a task, redacted.
    parameters, failed, _ = _prefect_runs(prefect_home / "prefect.db")
    assert parameters.count("***") >= 10, parameters
    assert any("no such file or folder" in m and "***" in m for m in failed), failed
    assert "no such file or folder" in console["bad-data stderr"] and "***" in console["bad-data stderr"]
    assert _prefect_runs(deploy_home / "prefect.db")[2] == ["COMPLETED"], console["deployment"][-3000:]
