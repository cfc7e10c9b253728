"""Retries for the tasks whose I/O can fail transiently: hub loads (data, models) and MLflow registry calls.

Prefect retries a task only when ``is_transient`` says the failure was the network or a busy server
(connection refused/reset, timeouts, HTTP 429/503 as MLflow reports them, a locked SQLite database), with
growing, jittered delays. Bad input, missing files and configuration errors fail at once: retrying them
would only delay the message. Registration is safe to retry because it is idempotent by model content.
"""

from __future__ import annotations

from typing import Any

from data_contracts import ContractError, DatasetNotCachedError

# MLflow error codes of a server that is overloaded or briefly failing (HTTP 429 / 503). INTERNAL_ERROR is
# left out: it is also the code of every MlflowException raised without one (mostly not transient).
TRANSIENT_MLFLOW_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
                                    "ABORTED"})
# Network errors of requests / urllib3 / httpx / http.client and SQLAlchemy's "database is locked", by name
# (they do not all derive from the built-in ConnectionError, and importing each library here is not needed).
TRANSIENT_NAMES = frozenset({"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "ProtocolError",
                             "ChunkedEncodingError", "RemoteDisconnected", "ConnectError", "ReadError",
                             "RetryError", "MaxRetryError"})
# A database error is transient only when it says the database is busy: "database is locked" (SQLite), not
# "database or disk is full", a missing table or a bad password.
TRANSIENT_DB_MESSAGES = ("database is locked", "database table is locked", "database is busy")
NEVER_RETRIED = (ContractError, DatasetNotCachedError, FileNotFoundError, PermissionError)


def is_transient(exc: BaseException | None) -> bool:
    """True when ``exc`` or anything in its cause chain is a transient I/O failure (and nothing in the chain
    is an error a retry cannot fix)."""
    seen: set[int] = set()
    transient = False
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, NEVER_RETRIED):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in TRANSIENT_NAMES \
                or getattr(exc, "error_code", None) in TRANSIENT_MLFLOW_CODES or _busy_database(exc):
            transient = True
        exc = exc.__cause__ or exc.__context__
    return transient


def _busy_database(exc: BaseException) -> bool:
    return type(exc).__name__ == "OperationalError" and any(m in str(exc).lower() for m in TRANSIENT_DB_MESSAGES)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    return is_transient(state.result(raise_on_failure=False))


def _options(retries: int, delays: list[float]) -> dict[str, Any]:
    return {"retries": retries, "retry_delay_seconds": delays, "retry_jitter_factor": 0.5,
            "retry_condition_fn": retry_transient}


HUB_RETRIES = _options(3, [5, 30, 120])         # hub downloads (datasets, base and policy models)
REGISTRY_RETRIES = _options(3, [2, 10, 30])     # MLflow registry calls (register, fetch a registered model)
