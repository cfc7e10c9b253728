"""The promotion gate: move the ``champion`` alias only to a better version, atomically.

Read the champion, compare, move the alias and re-read it, all under one file lock per (registry, model
name) (``promotion_lock``), keyed by the normalized registry URI (``registry_key``), so other spellings of
the same server share the lock. Gates on other hosts (other lock folders) are excluded on the registry
itself: a gate that is about to move the alias writes a claim tag and then reads every claim (``_claim``).
Decisions are recorded as version tags (``promotion/*``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.store.locks import file_lock

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
    """The champion alias changed under the gate, or another gate (another host or lock folder) was deciding at
    the same time; nothing this gate wrote is left as champion unless it is still the better model."""


CLAIM = "promotion/claim/"  # registered-model tag prefix: one per gate between its decision and its last check
CLAIM_TTL_S = 600.0  # a claim older than this is a crashed gate's, not a live rival's


def _rival_claims(client: MlflowClient, name: str, version: str) -> list[str]:
    """Other versions' live claims on model ``name`` (read from the registry, not a local lock)."""
    found = []
    for key, value in (client.get_registered_model(name).tags or {}).items():
        if not key.startswith(CLAIM) or key == f"{CLAIM}{version}":
            continue
        try:
            claim = json.loads(value)
            fresh = time.time() - float(claim["at"]) < CLAIM_TTL_S
        except (ValueError, KeyError, TypeError):
            fresh = True  # unreadable: assume a live rival
        if fresh:
            found.append(f"version {key[len(CLAIM):]} ({value})")
    return found


@contextlib.contextmanager
def _claim(client: MlflowClient, name: str, version: str) -> Iterator[None]:
    """Compare-and-set across hosts: write this gate's claim on the registry, then read every claim. Two gates
    that overlap (each writes before it reads) cannot both miss the other, so at most one moves the alias;
    one that sees a rival raises ``PromotionConflict`` before it moves anything. The claim is removed after."""
    client.set_registered_model_tag(name, f"{CLAIM}{version}", json.dumps(
        {"at": time.time(), "host": socket.gethostname(), "pid": os.getpid()}))
    try:
        rivals = _rival_claims(client, name, version)
        if rivals:
            raise PromotionConflict(f"model {name!r}: another promotion gate is deciding at the same time "
                                    f"({'; '.join(rivals)}), through another host or lock folder; this gate "
                                    f"moved nothing. Re-run it once the other has finished")
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model_tag(name, f"{CLAIM}{version}")


def promote_if_better(client: MlflowClient, name: str, version: str | int, metric: str, margin: float,
                      eval_set_id: str) -> PromotionDecision:
    """Move alias ``champion`` to ``version`` iff there is no champion, or the champion was evaluated on
    the same ``eval_set_id`` and score(version) > score(champion) + margin. Scores are the versions' tags
    named ``metric``. The decision, both scores and the reason are written as tags on ``version``.

    Atomic: the whole read-compare-set runs under ``promotion_lock`` (one host, one lock folder); across hosts
    a gate that decides to promote first claims the move on the registry (``_claim``: a rival gate deciding
    at the same time is a ``PromotionConflict``). The champion is read again after the claim, right before the
    alias moves (a hand-made alias change in between makes the gate decide again), and once more after it.
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
        with _claim(client, name, version) if promote else contextlib.nullcontext():
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
                    raise PromotionConflict(f"model {name!r}: this gate moved alias {CHAMPION!r} to version {version}, "
                                            f"but it now points at {after.version if after else 'nothing'}: another "
                                            "writer (not holding this registry's promotion lock) changed it; check "
                                            "the registry and re-run the gate")
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
