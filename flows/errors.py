"""How `gram` reports a failure: one line (exit 2 for a fixable one, 1 otherwise); --debug re-raises."""

from __future__ import annotations

# Failures a user can fix (bad config, a missing model, file, column or alias): one line, exit code 2.
# Matched by class name through the MRO, so classifying an error imports nothing (e.g. not MLflow).
EXPECTED_ERRORS = {"ConfigError", "ContractError", "ModelSourceError", "ModelNotFoundError", "ArtifactError",
                   "JudgeInputError", "ChatTemplateError", "NonFiniteLossError", "OSError", "InputError"}


class InputError(ValueError):
    """A command-line input the user can fix (a candidates file, a --model); `gram <cmd>: ...`, exit 2."""


def is_expected(err: BaseException) -> bool:
    return any(cls.__name__ in EXPECTED_ERRORS for cls in type(err).__mro__)


def error_line(command: str, err: BaseException) -> str:
    """The one line `gram` prints for a failure (without --debug), credentials redacted."""
    from tasks.redaction import redact

    return redact(_error_line(command, err))


def _contract_line(err: BaseException) -> str | None:
    """A contract error in one line: where, the first violation, how many more (``--debug`` shows them all)."""
    violations = getattr(err, "violations", None)
    contract = getattr(err, "contract", None)
    if not violations or contract is None or "\n" not in str(err).strip():
        return None  # not a contract error, or one that already says it in one line (TooManyInvalidRows)
    rest = [f"column {v.column!r}: {v.problem}" for v in violations[1:6]]
    more = (f" (and {len(violations) - 1} more: {'; '.join(rest)}{'; ...' if len(violations) > 6 else ''}; "
            "--debug shows each with its rows)") if rest else ""
    return (f"{getattr(err, 'source', '?')}: contract {contract.name!r} v{contract.version}: "
            f"{violations[0].describe()}{more}")


def _error_line(command: str, err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename:
        text = f"{err.strerror or type(err).__name__}: {err.filename}"
    else:
        text = _contract_line(err) or str(err).strip()
    if type(err).__name__ == "ConfigError":
        return f"gram {command}: configuration error: {text}"
    if is_expected(err):
        return f"gram {command}: {text}"
    return (f"gram {command}: unexpected error {type(err).__name__}: {text or '(no message)'} "
            "(run again with --debug for the traceback)")


def quiet_prefect_tracebacks() -> None:
    """Prefect logs a failing task's traceback on the console too; keep it in the run's logs (UI) only."""
    import logging

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()

    class NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            # The API handler (UI logs) already took the record: Prefect's run loggers hand it to that handler
            # before it propagates to the console handler.
            record.exc_info, record.exc_text = None, None
            return True

    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(NoTraceback())
