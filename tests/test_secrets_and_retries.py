"""Drill 7 (Ray auth, redacted URIs) and the retry policy of drill 8 (which failures are retried). The canary
drill is in tests/test_canary_drill.py."""

from __future__ import annotations

import json
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
