"""One redaction path for every value that leaves the process: MLflow params, tags and text artifacts, Prefect
flow parameters and logs, the console. ``redact`` hides credentials wherever a URI or a connection string
carries them; ``install_log_redaction`` applies it to every log record this process creates, and
``console_redacted`` to every write to ``sys.stdout``/``sys.stderr`` (libraries print too: MLflow writes
"View run <name> at: <tracking URI>/#/..." to stdout, the URI's password included)."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ParamSpec, TextIO, TypeVar
from urllib.parse import unquote

P = ParamSpec("P")
R = TypeVar("R")

REDACTED = "***"
# scheme://user:password@host: everything up to the last '@' of the word, so that a password holding '@' or
# '/' is hidden whole (a path with an '@' is over-redacted, which is the safe side).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<info>[^\s'\"<>`]*)@")
_SECRET_WORDS = r"(?:token|key|secret|passw|pwd|signature|sig|credential|auth)"
# ?token=..., &X-Amz-Signature=..., ;password=..., #access_token=... (a URL fragment)
_SECRET_QUERY = re.compile(rf"(?i)([?&;#][^=&\s#'\"]*{_SECRET_WORDS}[^=&\s#'\"]*=)([^&\s#'\"`]*)")
# libpq and ODBC key=value strings: "host=db password=s3cr3t", "password='a b'", "Pwd=x;"
_SECRET_KEYWORD = re.compile(r"(?i)(\b(?:password|passwd|pwd|sslpassword|secret|token|api[_-]?key|access[_-]?key)"
                             r"\s*=\s*)('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s'\"&;#`]+)")


# Every credential redact() has seen in this process: a library's error message may quote a piece of a URI
# without its scheme (requests reads 'http://u:p@ss/word@host' as host 'ss' and path '/word@host').
_KNOWN: set[str] = set()
_MIN_KNOWN = 6  # shorter pieces would hide ordinary words


def _learn(secret: str) -> None:
    for piece in {secret, *re.split(r"[@/:#?&=;'\"]", secret)}:
        if len(piece) >= _MIN_KNOWN and piece != REDACTED:
            _KNOWN.add(piece)


def _userinfo(match: re.Match) -> str:
    user, sep, password = match.group("info").partition(":")
    secret = password if sep else user  # a user name is no secret (and may be a common word); a lone token is
    _learn(secret)
    _learn(unquote(secret))  # 'p%40ss%2Fword' is the password 'p@ss/word', which a library may quote decoded
    return f"{match.group('scheme')}{REDACTED}@"


def _value(match: re.Match) -> str:
    _learn(match.group(2).strip("'\""))
    return f"{match.group(1)}{REDACTED}"


def redact(text: str) -> str:
    """``text`` with credentials replaced by ***: 'postgresql://u:p@ss/w@db/x' -> 'postgresql://***@db/x',
    '...?token=abc&x=1' -> '...?token=***&x=1', '...#token=abc' -> '...#token=***',
    'host=db password=abc' -> 'host=db password=***'; and any credential seen before, wherever it appears."""
    text = _USERINFO.sub(_userinfo, text)
    text = _SECRET_QUERY.sub(_value, text)
    text = _SECRET_KEYWORD.sub(_value, text)
    for secret in sorted(_KNOWN, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def remember(*texts: str) -> None:
    """Learn the credentials in ``texts`` (command-line arguments, environment values) before anything runs,
    so that a piece of one quoted without its URI is redacted too."""
    for text in texts:
        redact(text or "")


# Environment variables whose whole value is a credential: a name part like TOKEN, SECRET, PASSWORD or KEY
# (HF_TOKEN, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, PREFECT_API_KEY); not paths or modes.
_SECRET_ENV_PARTS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "APIKEY", "CREDENTIAL", "CREDENTIALS",
                     "AUTH", "SIGNATURE", "SAS"}
_NOT_SECRET_ENV_SUFFIXES = ("_FILE", "_PATH", "_DIR", "_SOCK", "_MODE", "_ID", "_URL_PATH")


def secret_env_names(environ: Mapping[str, str]) -> list[str]:
    """The variables of ``environ`` named like a credential (their whole value is one)."""
    return sorted(name for name in environ if set(name.upper().split("_")) & _SECRET_ENV_PARTS
                  and not name.upper().endswith(_NOT_SECRET_ENV_SUFFIXES))


def remember_environment(environ: Mapping[str, str] | None = None) -> None:
    """Learn the credentials the environment holds before anything runs: every value's URI credentials,
    query tokens and ``password=`` pieces, and the whole value of each variable named like a credential."""
    import os

    environ = os.environ if environ is None else environ
    for name, value in environ.items():
        redact(value or "")
        if name in secret_env_names({name: value}) and len(value or "") >= _MIN_KNOWN:
            _learn(value)


@contextlib.contextmanager
def process_redacted() -> Iterator[None]:
    """What `gram` sets up before a command, for a flow started any other way (a deployment run by a Prefect
    worker): secrets in the environment learnt, log records and console writes redacted, exceptions too."""
    remember_environment()
    install_log_redaction()
    with console_redacted(), errors_redacted():
        yield


def redact_value(value: Any) -> Any:
    """``value`` with every string inside it (dict keys and values, list items) redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {redact_value(k): redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value) if isinstance(value, list) else tuple(
            redact_value(v) for v in value)
    return value


def redact_error(err: BaseException) -> BaseException:
    """``err`` (and its causes) with credentials removed from its arguments, in place; returns it. Used where
    an exception is about to be stored (Prefect's state message) or printed."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            current.args = tuple(redact(a) if isinstance(a, str) else a for a in current.args)
            if isinstance(current, OSError) and isinstance(current.filename, str):
                current.filename = redact(current.filename)
        except (AttributeError, TypeError):
            pass
        current = current.__cause__ or current.__context__
    return err


@contextlib.contextmanager
def errors_redacted() -> Iterator[None]:
    """An exception leaves the block with its credentials redacted: around every flow body, before Prefect
    stores it as the run's state message (its database) or logs it. (A flow is not wrapped by
    ``scrub_errors``: Prefect resolves a flow's parameter annotations in the globals of its function.)"""
    try:
        yield
    except BaseException as err:
        redact_error(err)
        raise


def scrub_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator for every task body: ``errors_redacted`` around it. Signature and source stay ``fn``'s
    (``functools.wraps``), so Prefect's parameters and cache keys (TASK_SOURCE) are unchanged."""

    @functools.wraps(fn)
    def body(*args: P.args, **kwargs: P.kwargs) -> R:
        with errors_redacted():
            return fn(*args, **kwargs)

    return body


def _redacting_factory(base: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is logging's to report, not ours
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        return record

    factory.gram_redacts = True  # type: ignore[attr-defined]
    return factory


def install_log_redaction() -> None:
    """Every log record created in this process from now on carries redacted text (message and traceback),
    whichever handler takes it: the console, Prefect's API (the run's logs in its database), files."""
    base = logging.getLogRecordFactory()
    if not getattr(base, "gram_redacts", False):
        logging.setLogRecordFactory(_redacting_factory(base))


class _RedactingStream:
    """A text stream that passes ``redact(text)`` on to the stream it wraps; everything else is the wrapped
    stream's. Each ``write`` is redacted whole (libraries write a URI in one call)."""

    gram_redacts = True

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def console_redacted() -> Iterator[None]:
    """Inside the block, every write to ``sys.stdout`` and ``sys.stderr`` (ours, a library's print, Ray's
    forwarded worker output) is redacted; the streams are put back after it. Writes to the file descriptors
    themselves (C code) do not pass through Python and are not covered."""
    saved = sys.stdout, sys.stderr
    if not getattr(sys.stdout, "gram_redacts", False):
        sys.stdout = _RedactingStream(sys.stdout)  # type: ignore[assignment]
    if not getattr(sys.stderr, "gram_redacts", False):
        sys.stderr = _RedactingStream(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
