"""Drill 7 (Ray auth, redacted URIs) and the retry policy of drill 8 (which failures are retried)."""

from __future__ import annotations

import pytest

from tasks.tracking import redact


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

    from tasks import tracking
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


def test_ray_token_auth_is_left_on(monkeypatch):
    """The local runtime is started without touching RAY_AUTH_MODE (Ray's default: token auth on)."""
    import ray

    from flows.cli import OFFLINE_DEFAULTS
    from tasks.ray_runtime import ray_runtime
    from tasks.settings import RayConfig

    assert "RAY_AUTH_MODE" not in OFFLINE_DEFAULTS
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw, auth=__import__("os").environ.get("RAY_AUTH_MODE")))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with ray_runtime(RayConfig()):
        pass
    assert seen["auth"] is None and "num_cpus" in seen


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
    for options in (HUB_RETRIES, REGISTRY_RETRIES):
        assert options["retries"] >= 2 and options["retry_delay_seconds"] == sorted(options["retry_delay_seconds"])


def test_unreachable_tracking_server_is_reported_with_what_to_do():
    from tasks.tracking import TrackingServerUnreachable, check_tracking_server

    check_tracking_server("sqlite:////tmp/x.db")  # no server behind a file URI: nothing to check
    with pytest.raises(TrackingServerUnreachable, match=r"http://\*\*\*@127\.0\.0\.1:9 is unreachable after 2 "
                                                        r"tries.*nothing was run.*MLFLOW_TRACKING_URI"):
        check_tracking_server("http://user:pw@127.0.0.1:9", attempts=2, timeout_s=2, backoff_s=0.01)
