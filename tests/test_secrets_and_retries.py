"""Drill 7 (Ray auth, redacted URIs) and the retry policy of drill 8 (which failures are retried)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.on_mlflow.tracking import redact

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("uri, secret", [
    ("postgresql://mlflow:s3cr3t@db.internal:5432/mlflow", "s3cr3t"),
    ("https://ghp_TOKEN123@mlflow.example.com", "ghp_TOKEN123"),
    ("s3://bucket/store?X-Amz-Signature=abcdef&region=eu", "abcdef"),
    ("https://mlflow.example.com/api?token=tok987", "tok987"),
])
def test_credentials_in_uris_are_redacted(uri, secret):
    out = redact(uri)
    assert secret not in out and "***" in out
    assert redact("sqlite:////home/u/.gram/mlflow.db") == "sqlite:////home/u/.gram/mlflow.db"
    assert redact("s3://bucket/store?region=eu") == "s3://bucket/store?region=eu"


def test_params_and_tags_logged_to_mlflow_are_redacted(mlflow_root):
    from mlflow import MlflowClient

    from tasks.on_mlflow import tracking
    from tasks.settings import MlflowConfig

    cfg = MlflowConfig(experiment="redact")
    with tracking.start_pipeline_run(cfg, mlflow_root / "home", "redact", params={
            "mlflow": {"tracking_uri": "postgresql://u:hunter2@db/x"},
            "artifact_store": "s3://b/p?sig=zzz999", "stores": ["https://a:pw123@h/x"]},
            tags={"where": "https://a:pw456@h"}) as run:
        tracking.set_tags({"store": "gs://k:pw789@bucket"}, run_id=run.run_id)
    data = MlflowClient(run.tracking_uri).get_run(run.run_id).data
    logged = " ".join([*data.params.values(), *data.tags.values()])
    for secret in ("hunter2", "zzz999", "pw123", "pw789"):
        assert secret not in logged
    assert data.params["mlflow.tracking_uri"] == "postgresql://***@db/x"


RAY_PROBE = """
import json, ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from tasks.on_ray.runtime import ray_runtime
from tasks.settings import RayConfig

with ray_runtime(RayConfig(object_store_memory_mb=100)):
    @ray.remote
    def worker_sees():
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
        return is_token_auth_enabled()

    print(json.dumps({"driver": is_token_auth_enabled(), "worker": ray.get(worker_sees.remote())}))
"""


def test_drill_a_real_local_ray_runtime_has_token_auth_on(tmp_path):
    """Drill 7: a real local runtime, started as `gram run` starts it (RAY_AUTH_MODE unset, no RAY_ADDRESS),
    has token auth on in the driver and in a worker, with its token under the user's ~/.ray."""
    import os
    import subprocess
    import sys

    from flows.cli import OFFLINE_DEFAULTS

    assert "RAY_AUTH_MODE" not in OFFLINE_DEFAULTS
    ray_tmp = Path(f"/tmp/gr-auth-{os.getpid()}")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(HOME=str(tmp_path), RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    try:
        out = subprocess.run([sys.executable, "-c", RAY_PROBE], env=env, capture_output=True, text=True, timeout=300)
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"driver": True, "worker": True}
    assert (tmp_path / ".ray" / "auth_token").is_file()


def test_only_transient_failures_are_retried():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    from data_contracts import PREFERENCE_PAIRS, ContractError, DatasetNotCachedError
    from tasks.retries import HUB_RETRIES, REGISTRY_RETRIES, is_transient

    def chained(outer, inner):
        try:
            raise inner
        except BaseException:
            try:
                raise outer
            except BaseException as err:
                return err

    assert is_transient(ConnectionError("refused")) and is_transient(TimeoutError())
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_transient(chained(RuntimeError("load failed"), ConnectionResetError()))
    assert not is_transient(MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(ContractError("f.jsonl", PREFERENCE_PAIRS, []))
    assert not is_transient(chained(DatasetNotCachedError("offline"), ConnectionError()))
    assert not is_transient(ValueError("bad config")) and not is_transient(None)
    assert not is_transient(MlflowException("a plain MLflow error"))  # INTERNAL_ERROR by default
    from sqlalchemy.exc import OperationalError

    assert is_transient(chained(MlflowException("register failed"),
                                OperationalError("INSERT", {}, Exception("database is locked"))))
    for permanent in ("database or disk is full", "no such table: model_versions", "disk I/O error"):
        assert not is_transient(OperationalError("INSERT", {}, Exception(permanent))), permanent
    for options in (HUB_RETRIES, REGISTRY_RETRIES):
        assert options["retries"] >= 2 and options["retry_delay_seconds"] == sorted(options["retry_delay_seconds"])


def test_unreachable_tracking_server_is_reported_with_what_to_do():
    from tasks.on_mlflow.tracking import TrackingServerUnreachable, check_tracking_server

    check_tracking_server("sqlite:////tmp/x.db")  # no server behind a file URI: nothing to check
    with pytest.raises(TrackingServerUnreachable, match=r"http://\*\*\*@127\.0\.0\.1:9 is unreachable after 2 "
                                                        r"tries.*nothing was run.*MLFLOW_TRACKING_URI"):
        check_tracking_server("http://user:pw@127.0.0.1:9", attempts=2, timeout_s=2, backoff_s=0.01)


# --------------------------------------------------------------------------------------------------
# Drill 1 (canary): a secret in every URI and override form never leaves the process.
# --------------------------------------------------------------------------------------------------
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
    import sys

    from tasks.redaction import console_redacted

    with console_redacted():
        sys.stdout.write("View run r at: http://gram:Zq8pw77xy@127.0.0.1:5000/#/experiments/1\n")
        print("token=Zq8pw77xy", file=sys.stderr)
    print("after the block: written as-is")
    out, err = capsys.readouterr()
    assert "Zq8pw77xy" not in out + err and "http://***@127.0.0.1:5000/#/experiments/1" in out
    assert "after the block" in out and not getattr(sys.stdout, "gram_redacts", False)


def _hits(root, needles: tuple[bytes, ...]) -> list[str]:
    """Files under ``root`` whose bytes contain any of ``needles``."""
    return [str(p) for p in Path(root).rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _mlflow_server(root: Path) -> Iterator[int]:
    """A real MLflow tracking server on 127.0.0.1 (a free port; sqlite backend, proxied artifacts and its console
    log under ``root``), stopped by its pid at the end (its uvicorn and job-runner children stop with it)."""
    import subprocess
    import sys
    import time

    import requests

    port = _free_port()
    root.mkdir()
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                 "--artifacts-destination", str(root / "artifacts")],
                                cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"mlflow server exited: {log.read_text()[-2000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"mlflow server not up after 180 s: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started, nothing else
            proc.wait(30)


def _gram(args: list[str], env: dict[str, str]) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds) of one real `gram` process."""
    import subprocess
    import sys
    import time

    began = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1500)
    return out.returncode, out.stdout, out.stderr, time.monotonic() - began


def _prefect_runs(db: Path) -> tuple[str, list[str]]:
    """(every flow run's parameters as JSON text, the messages of failed flow-run states) from Prefect's database."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con:
        parameters = json.dumps([row[0] for row in con.execute("SELECT parameters FROM flow_run")])
        failed = [row[0] or "" for row in con.execute("SELECT message FROM flow_run_state WHERE type = 'FAILED'")]
    return parameters, failed


def test_drill_canary_secret_reaches_no_state_folder_database_or_console(tmp_path):
    """Drill 1 (canary), on real `gram` processes against a real local MLflow server whose URI carries the canary
    in its password (with '@' and '/', percent-encoded):
      1. `gram run --preset smoke` with that URI as `--set mlflow.tracking_uri=...` and libpq strings holding the
         canary in two more `--set` values: succeeds, registers version 1 on that server;
      2. `gram study --preset smoke` with the URI in $MLFLOW_TRACKING_URI: succeeds;
      3. `gram run` with data URLs carrying it (password, `?token=`, `#access_token=`): fails in its first task
         (the readers take local paths only), so the secret crosses the failure path (state messages, error line).
    Then the state folder, the server's database, artifact root and log, Prefect's database, Ray's session folder
    and the console hold the canary 0 times (also as UTF-16 and as the base64 of an Authorization header)."""
    import base64
    import shutil
    from urllib.parse import quote

    from mlflow import MlflowClient

    home, prefect_home, server_root = tmp_path / "home", tmp_path / "prefect", tmp_path / "mlflow-server"
    ray_tmp = Path(f"/tmp/gc-{os.getpid()}")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(GRAM_HOME=str(home), PREFECT_HOME=str(prefect_home), RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(ROOT),
               GRAM_LOCK_DIR=str(tmp_path / "locks"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="900",
               HF_TOKEN=f"hf_{CANARY}")  # a credential in another environment variable (unused offline)
    study_out = tmp_path / "study-out" / "study.md"  # `gram study --out` writes its command line there
    study_out.parent.mkdir()
    libpq = [f"--set=data.eval.name={SECRET_FORMS['libpq password']}",  # a hub config name: unused for a path
             f"--set=data.preferences.name={SECRET_FORMS['libpq quoted password']}"]
    data_urls = [f"--set=data.eval.path={SECRET_FORMS['query token']}",
                 f"--set=data.preferences.path={SECRET_FORMS['fragment token']}",
                 f"--set=data.prompts.path=https://gram:{PASSWORD}@data.invalid/p.jsonl"]
    console, codes, seconds = {}, {}, {}
    try:
        with _mlflow_server(server_root) as port:
            uri = f"http://gram:{quote(PASSWORD, safe='')}@127.0.0.1:{port}"
            for name, args, extra in (
                    ("run", ["run", "--preset", "smoke", f"--set=mlflow.tracking_uri={uri}", *libpq], {}),
                    ("study", ["study", "--preset", "smoke", *libpq, "--out", str(study_out)],
                     {"MLFLOW_TRACKING_URI": uri}),
                    ("bad-data", ["run", "--preset", "smoke", *data_urls], {"MLFLOW_TRACKING_URI": uri})):
                codes[name], out, err, seconds[name] = _gram(args, {**env, **extra})
                (tmp_path / f"{name}.out").write_text(out)
                (tmp_path / f"{name}.err").write_text(err)
                console[f"{name} stdout"], console[f"{name} stderr"] = out, err
                assert codes[name] == (2 if name == "bad-data" else 0), (name, err[-3000:])
            client = MlflowClient(uri)
            versions = client.search_model_versions("name = 'gram-reward-model-smoke'")
            experiment = client.get_experiment_by_name("gram-smoke")
            runs = client.search_runs([experiment.experiment_id], "tags.`gram.stage` = 'finetune'")
            parents = client.search_runs([experiment.experiment_id], "tags.`gram.preset` = 'smoke'")
        needles = (CANARY.encode(), CANARY.encode("utf-16-le"),
                   base64.b64encode(f"gram:{PASSWORD}".encode()))  # as an Authorization header carries it
        hits = [*_hits(home, needles), *_hits(server_root, needles), *_hits(prefect_home, needles),
                *_hits(ray_tmp, needles),  # Ray's session folder: its logs, spilled objects
                *_hits(study_out.parent, needles),  # the study report with its command line
                *[f"{name}: {line}" for name, text in console.items() for line in text.splitlines() if CANARY in line]]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(seconds)  # shown with -s, or when the drill fails
    assert hits == [], hits  # the canary count
    # The secret-bearing URI was really used: the run registered on that server, and the study logged there too.
    assert [v.version for v in versions] == ["1"], versions
    assert runs and runs[0].data.tags["gram.artifact"]  # the stage's artifact tag was written
    redacted_uri = f"http://***@127.0.0.1:{port}"
    params = [r.data.params for r in parents]
    assert any(p.get("config.mlflow.tracking_uri") == redacted_uri for p in params), params
    assert any(p.get("config.data.eval.name") == "host=db.invalid user=gram password=*** dbname=mlflow" for p in params)
    assert "study" in {r.data.tags.get("gram.flow") for r in parents}, [r.data.tags for r in parents]
    assert "password=***" in study_out.read_text()  # the --set values are in the report's command, redacted
    assert f"at {redacted_uri}" in console["run stdout"]  # the summary names the server, redacted
    # ... and the overrides reached Prefect redacted, and the bad data URLs failed in a task, redacted.
    parameters, failed = _prefect_runs(prefect_home / "prefect.db")
    assert parameters.count("***") >= 8, parameters
    assert any("no such file or folder" in m and "***" in m for m in failed), failed
    assert "no such file or folder" in console["bad-data stderr"] and "***" in console["bad-data stderr"]
