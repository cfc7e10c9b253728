"""The promotion gate: move the ``champion`` alias only to a better version, atomically.

Read the champion, compare, move the alias and re-read it, all under one file lock per (registry, model
name) (``promotion_lock``), keyed by the normalized registry URI (``registry_key``), so other spellings of
the same server share the lock. Decisions are recorded as version tags (``promotion/*``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.locks import file_lock

CHAMPION, CANDIDATE = "champion", "candidate"


@dataclasses.dataclass(frozen=True)
class PromotionDecision:
    """What the gate decided for one version, and why (also stored as ``promotion/*`` version tags)."""

    decision: str                      # "promoted" or "kept"
    name: str
    version: str
    metric: str
    candidate_score: float
    champion_version: str | None       # the champion before the decision
    champion_score: float | None
    margin: float
    eval_set_id: str
    champion_eval_set_id: str | None
    reason: str

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


def _alias_version(client: MlflowClient, name: str, alias: str):
    """The ModelVersion an alias points at, or None when the alias (or the model) does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # alias, model missing
            return None
        raise


def _score(tags: Mapping[str, str], metric: str) -> float | None:
    return float(tags[metric]) if metric in tags else None


LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0", "ip6-localhost"}
DEFAULT_PORTS = {"http": 80, "https": 443}


def registry_key(tracking_uri: str) -> str:
    """One spelling per registry, for keying its lock: credentials, query and fragment dropped, scheme and host
    lower-cased, loopback aliases (127.0.0.1, ::1) as 'localhost', default ports and trailing slashes dropped,
    a SQLite or file path resolved (symlinks, '..', '//')."""

    parts = urlsplit(tracking_uri.strip())
    scheme = parts.scheme.lower()
    if scheme in ("sqlite", "file") or "://" not in tracking_uri:
        path = tracking_uri.split("://", 1)[-1].split("?", 1)[0].split("#", 1)[0]
        path = path[1:] if scheme == "sqlite" and path.startswith("/") else path  # sqlite:///x -> x
        return f"{scheme or 'file'}:///{os.path.realpath(path or '.').lstrip('/')}"
    host = (parts.hostname or "").lower()
    host = "localhost" if host in LOOPBACK else host
    try:
        port = parts.port
    except ValueError:
        port = None
    port_text = f":{port}" if port and port != DEFAULT_PORTS.get(scheme) else ""
    path = "/" + "/".join(p for p in parts.path.split("/") if p)
    return f"{scheme}://{host}{port_text}{path.rstrip('/')}"


def promotion_lock_path(tracking_uri: str, name: str) -> Path:
    """The lock file that serializes registration and promotion of model ``name`` in one registry, keyed by
    ``registry_key`` (so a trailing slash, a loopback alias or credentials do not give a second lock)."""
    key = registry_key(tracking_uri)
    digest = hashlib.sha256(f"{key}\0{name}".encode()).hexdigest()[:16]
    if key.startswith("sqlite:///"):  # everyone who can write the database can lock beside it
        folder = Path(key[len("sqlite://"):]).parent / ".gram-locks"
    else:
        folder = Path(os.environ.get("GRAM_LOCK_DIR") or Path.home() / ".cache" / "gram" / "locks")
    return folder / f"promote-{digest}.lock"


def promotion_lock(tracking_uri: str, name: str):
    """Exclusive lock (threads and processes) around read champion -> compare -> move alias."""
    return file_lock(promotion_lock_path(tracking_uri, name), f"promotion of {name!r}", owner_thread=True)


def _decide(name: str, version: str, score: float, champion: Any, metric: str, margin: float,
            eval_set_id: str) -> tuple[bool, str]:
    champ_version = str(champion.version) if champion else None
    champ_score = _score(champion.tags, metric) if champion else None
    champ_set = champion.tags.get("eval_set_id") if champion else None
    if not math.isfinite(score):
        return False, f"candidate {metric} = {score} is not finite"
    if champion is None:
        return True, "no champion yet"
    if champ_version == version:
        return False, f"version {version} is already the champion"
    if champ_set != eval_set_id:
        return False, (f"not comparable: champion v{champ_version} was evaluated on eval set {champ_set!r}, the "
                       f"candidate on {eval_set_id!r}; re-evaluate the champion on {eval_set_id!r} or set the alias "
                       "by hand")
    if champ_score is None or not math.isfinite(champ_score):
        return False, f"not comparable: champion v{champ_version} has no finite {metric!r} tag"
    if score > champ_score + margin:
        return True, f"{metric} {score:.6g} > champion v{champ_version} {champ_score:.6g} + margin {margin:g}"
    return False, f"{metric} {score:.6g} <= champion v{champ_version} {champ_score:.6g} + margin {margin:g}"


class PromotionConflict(RuntimeError):
    """The champion alias changed under the gate (a writer that did not take the promotion lock)."""


def promote_if_better(client: MlflowClient, name: str, version: str | int, metric: str, margin: float,
                      eval_set_id: str) -> PromotionDecision:
    """Move alias ``champion`` to ``version`` iff there is no champion, or the champion was evaluated on
    the same ``eval_set_id`` and score(version) > score(champion) + margin. Scores are the versions' tags
    named ``metric``. The decision, both scores and the reason are written as tags on ``version``.

    Atomic: the whole read-compare-set runs under ``promotion_lock``, and the champion is read again right
    before the alias moves (a hand-made alias change in between makes the gate decide again).
    """
    version = str(version)
    with promotion_lock(client.tracking_uri, name):
        tags = client.get_model_version(name, version).tags
        score = _score(tags, metric)
        if score is None:
            raise ValueError(f"promote_if_better: model {name!r} version {version} has no tag {metric!r} "
                             f"(the promotion metric); its tags are {sorted(tags)}")
        champion = _alias_version(client, name, CHAMPION)
        promote, reason = _decide(name, version, score, champion, metric, margin, eval_set_id)
        while promote:
            now = _alias_version(client, name, CHAMPION)
            if (now and str(now.version)) == (champion and str(champion.version)):
                break
            champion = now
            promote, reason = _decide(name, version, score, champion, metric, margin, eval_set_id)
        champ_version = str(champion.version) if champion else None
        champ_score = _score(champion.tags, metric) if champion else None
        if promote:
            client.set_registered_model_alias(name, CHAMPION, version)
            after = _alias_version(client, name, CHAMPION)  # verify: a writer outside the lock may have won
            if after is None or str(after.version) != version:
                raise PromotionConflict(f"model {name!r}: this gate moved alias {CHAMPION!r} to version {version}, but "
                                        f"it now points at {after.version if after else 'nothing'}: another writer "
                                        "(not holding this registry's promotion lock) changed it; check the "
                                        "registry and re-run the gate")
            if champion is not None:
                client.set_model_version_tag(name, champ_version, "promotion/superseded_by", version)
        decision = PromotionDecision("promoted" if promote else "kept", name, version, metric, score,
                                     champ_version, champ_score, margin, eval_set_id,
                                     champion.tags.get("eval_set_id") if champion else None, reason)
        for key, value in {"decision": decision.decision, "reason": reason, "metric": metric,
                           "candidate_score": repr(score), "champion_score": repr(champ_score),
                           "champion_version": str(champ_version), "margin": repr(margin)}.items():
            client.set_model_version_tag(name, version, f"promotion/{key}", value)
    return decision
