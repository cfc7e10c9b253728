"""The reward server's request and response shapes, checked without Ray or a model (tasks/serving/server.py serves them).

Every endpoint reduces to a list of pairs (prompt, y1, y2) scored for P(y1 ≻ y2) in both slot orders; what a
request asks for is read back from those probabilities. A bad request raises ``RequestError`` with the HTTP
status and a reason naming the field and index; request texts are never put in a reason or a log line.

OpenRLHF (``--reward.remote_url`` since 0.10.2, ``--remote_rm_url`` before; openrlhf/utils/agent.py) posts
``{"query": [...], "prompts": [...], "labels": [...]}``: ``query[i]`` is the decode of the (possibly left-cut)
prompt tokens + the response tokens, so it need not start with ``prompts[i]``; both carry the policy's chat
template and the response its end-of-turn text (gram_core/policy_templates.py reads them back to plain text).
``labels[i]`` is the reference response (``--data.label_key``; without it OpenRLHF sends ""). It reads
``rewards``, ``scores`` and ``extra_logs`` (numbers per item, logged as metrics), with a 180 s timeout and 5
tries on any non-2xx answer.

Every text is checked before it reaches a tokenizer: a lone surrogate or a NUL is a 422 naming the field.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from gram_core.policy_templates import (
    POLICY_TEMPLATES,
    detect_template,
    plain_prompt,
    plain_response,
    split_query,
)
from gram_core.report import is_correct
from gram_core.reward_scoring import DEFAULT_MAX_GROUP, reward_logit

POLICY_TEMPLATE_CHOICES = (*POLICY_TEMPLATES, "none", "auto")

Pair = tuple[str, str, str]  # (prompt, y1, y2): scored for P(y1 ≻ y2)


class RequestError(Exception):
    """An answer other than 200: ``status`` (401, 413, 422, 503) and a one-line reason.

    No 429: the server's only bound is its own queue, shared by all clients, so overload is a 503 with
    Retry-After (which every client we serve retries); there is no per-client rate to exceed."""

    def __init__(self, status: int, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.status, self.reason, self.retry_after_s = status, reason, retry_after_s


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; beyond it the answer is 413 (422 for a bad shape)."""

    max_body_bytes: int = 8 * 2**20   # request body
    max_rows: int = 512               # judge sequences (2 per pair) per batch: a bigger request is scored in parts
    max_request_rows: int | None = None  # judge sequences one request may carry (None: max_rows); 413 beyond
    max_request_tokens: int = 2**18   # tokens of all texts of one request
    max_group: int = DEFAULT_MAX_GROUP  # completions per GRPO group: n(n−1)/2 pairs
    max_queue_rows: int = 4096        # sequences admitted and not yet answered, per replica; beyond: 503
    reward: str = "probability"       # /get_reward 'rewards': 'probability' P or 'logit' log(P/(1−P))
    policy_template: str = "auto"     # /get_reward: the policy's chat template to strip (auto: detect per prompt)

    def __post_init__(self) -> None:
        if self.max_request_rows is None:
            object.__setattr__(self, "max_request_rows", self.max_rows)
        if self.reward not in ("probability", "logit"):
            raise ValueError(f"reward must be 'probability' or 'logit', got {self.reward!r}")
        if self.policy_template not in POLICY_TEMPLATE_CHOICES:
            raise ValueError(f"policy_template must be one of {', '.join(POLICY_TEMPLATE_CHOICES)}, got "
                             f"{self.policy_template!r}")
        if self.max_rows < 2 or self.max_request_rows < 2 or \
                self.max_queue_rows < max(self.max_rows, self.max_request_rows):
            raise ValueError(f"need max_rows >= 2, max_request_rows >= 2 and max_queue_rows >= both (a request over "
                             f"the queue bound could never be admitted), got {self.max_rows}, "
                             f"{self.max_request_rows}, {self.max_queue_rows}")
        if self.max_group * (self.max_group - 1) > self.max_rows:
            raise ValueError(f"a GRPO group of max_group={self.max_group} is {self.max_group * (self.max_group - 1)}"
                             f" sequences, more than max_rows={self.max_rows}")


@dataclasses.dataclass
class Job:
    """One request as pairs, and how to read its answer from their probabilities."""

    pairs: list[Pair]
    # (P order 1, P order 2, truncated per pair) -> JSON body
    answer: Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, Any]]
    texts: list[str] = dataclasses.field(default_factory=list)  # every text, for the token count

    @property
    def rows(self) -> int:
        return 2 * len(self.pairs)


async def read_body(chunks: AsyncIterator[bytes], cap: int) -> bytes:
    """The body from its chunks, stopped as soon as it passes ``cap`` bytes (a chunked body declares no length)."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > cap:
            raise RequestError(413, f"request body is more than the cap {cap} bytes (stopped reading at {size})")
        parts.append(chunk)
    return b"".join(parts)


def parse_body(raw: bytes, limits: ServeLimits) -> dict[str, Any]:
    if len(raw) > limits.max_body_bytes:
        raise RequestError(413, f"request body is {len(raw)} bytes, more than the cap {limits.max_body_bytes}")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON, invalid UTF-8, a 5000-digit number
        raise RequestError(422, f"body: not valid JSON ({err.__class__.__name__} at position "
                           f"{getattr(err, 'pos', '?')})") from None
    if not isinstance(body, dict):
        raise RequestError(422, f"body: expected a JSON object, got {type(body).__name__}")
    return body


def _strings(body: dict, field: str, required: bool = True) -> list[str] | None:
    value = body.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, list):
        raise RequestError(422, f"{field}: expected a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        _string(f"{field}[{i}]", item)
    return value


def _string(where: str, value: Any) -> str:
    """``value`` if it is text a tokenizer takes: a string of Unicode scalar values without NUL."""
    if not isinstance(value, str):
        raise RequestError(422, f"{where}: expected a string, got {type(value).__name__}")
    if "\x00" in value:
        raise RequestError(422, f"{where}: contains NUL (U+0000) at character {value.index(chr(0))}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's "\ud800" escape decodes to a lone surrogate
        raise RequestError(422, f"{where}: lone surrogate U+{ord(value[err.start]):04X} at character {err.start}; "
                           "send valid UTF-16 pairs or UTF-8") from None
    return value


def _finite(values: np.ndarray, where: str) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):  # never NaN: an internal failure, not a reward
        raise ArithmeticError(f"{where}: non-finite score")
    return out


def _check_size(job: Job, limits: ServeLimits, what: str) -> Job:
    if job.rows > limits.max_request_rows:
        raise RequestError(413, f"{what}: {len(job.pairs)} pairs ({job.rows} sequences), more than the cap of "
                           f"{limits.max_request_rows} sequences per request; split the request (or raise "
                           "`gram serve --max-rows`)")
    return job


def batch_parts(pairs: list[Pair], max_rows: int) -> list[list[Pair]]:
    """A request's pairs in parts of at most ``max_rows`` judge sequences, each a job for the batcher: a request
    over the batch bound (allowed by ``max_request_rows``) never makes a bigger batch, so memory stays bounded."""
    step = max(1, max_rows // 2)
    return [pairs[i:i + step] for i in range(0, len(pairs), step)]


LABEL_HINT = ("labels[i] must be the reference response of query i (the reward is P(response ≻ reference)); "
              "pass the dataset's reference column to OpenRLHF (--data.label_key since 0.10.2, --label_key before)")


def openrlhf_job(body: dict, limits: ServeLimits) -> Job:
    """POST /get_reward: reward of query[i]'s response against labels[i] (the reference).

    The response starts where ``split_query`` finds the prompt's end; prompt, response and label lose the
    policy's chat template (``limits.policy_template``, or detected per prompt with "auto"). extra_logs carry,
    per item, how the query was split (0 = it started with the prompt) and whether the judge truncated it.
    """
    queries = _strings(body, "query")
    prompts = _strings(body, "prompts")
    labels = _strings(body, "labels", required=False)
    if labels is None:
        raise RequestError(422, f"labels: missing; {LABEL_HINT}")
    sizes = {"query": len(queries), "prompts": len(prompts), "labels": len(labels)}
    if len(set(sizes.values())) != 1:
        raise RequestError(422, f"query, prompts, labels: lengths disagree {sizes}")
    fixed = None if limits.policy_template in ("auto", "none") else POLICY_TEMPLATES[limits.policy_template]
    pairs, methods = [], []
    for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels, strict=True)):
        template = detect_template(prompt) if limits.policy_template == "auto" else fixed
        start, method = split_query(query, prompt, template)
        reference = plain_response(label, template)
        if not reference.strip():
            raise RequestError(422, f"labels[{i}]: empty; {LABEL_HINT}")
        pairs.append((plain_prompt(prompt, template), plain_response(query[start:], template), reference))
        methods.append(float(method))

    def answer(p1: np.ndarray, p2: np.ndarray, truncated: np.ndarray) -> dict[str, Any]:
        p = (p1 + p2) / 2
        rewards = reward_logit(p) if limits.reward == "logit" else p
        return {"rewards": _finite(rewards, "rewards"), "scores": _finite(p, "scores"),
                "extra_logs": {"gram_p_order1": _finite(p1, "p_order1"), "gram_p_order2": _finite(p2, "p_order2"),
                               "gram_query_split": methods, "gram_truncated": [float(t) for t in truncated]}}

    return _check_size(Job(pairs, answer, [t for pair in pairs for t in pair]), limits, "query")


def pairwise_job(body: dict, limits: ServeLimits) -> Job:
    """POST /v1/pairwise {"items": [{prompt, a, b}]} -> P(a) in each slot order, their mean, the winner."""
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise RequestError(422, f"items: expected a non-empty list of {{prompt, a, b}}, got {type(items).__name__}")
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RequestError(422, f"items[{i}]: expected an object {{prompt, a, b}}, got {type(item).__name__}")
        pairs.append(tuple(_string(f"items[{i}].{k}", item.get(k)) for k in ("prompt", "a", "b")))

    def answer(p1: np.ndarray, p2: np.ndarray, truncated: np.ndarray) -> dict[str, Any]:
        p = (p1 + p2) / 2
        return {"results": [{"p_a_order1": a1, "p_a_order2": a2, "p_a": pa, "winner": "a" if is_correct(pa) else "b"}
                            for a1, a2, pa in zip(_finite(p1, "p"), _finite(p2, "p"), _finite(p, "p"), strict=True)]}

    return _check_size(Job(pairs, answer, [t for pair in pairs for t in pair]), limits, "items")


def grpo_job(body: dict, limits: ServeLimits) -> Job:
    """POST /v1/grpo {"groups": [{prompt, completions, reference?}]} -> one reward list per group.

    With a reference: P(completion ≻ reference). Without: group-relative, mean P(y_i ≻ y_j) over j ≠ i from
    the n(n−1)/2 pairs (n ≤ max_group).
    """
    groups = body.get("groups")
    if not isinstance(groups, list) or not groups:
        raise RequestError(422, f"groups: expected a non-empty list of {{prompt, completions}}, got "
                           f"{type(groups).__name__}")
    pairs: list[Pair] = []
    plans = []  # per group: (first pair index, n, reference or None)
    for g, group in enumerate(groups):
        if not isinstance(group, dict):
            raise RequestError(422, f"groups[{g}]: expected an object {{prompt, completions}}")
        prompt = _string(f"groups[{g}].prompt", group.get("prompt"))
        completions = group.get("completions")
        if not isinstance(completions, list) or not completions:
            raise RequestError(422, f"groups[{g}].completions: expected a non-empty list of strings")
        for i, completion in enumerate(completions):
            _string(f"groups[{g}].completions[{i}]", completion)
        reference = group.get("reference")
        if reference is not None:
            _string(f"groups[{g}].reference", reference)
            plans.append((len(pairs), len(completions), reference))
            pairs += [(prompt, c, reference) for c in completions]
            continue
        if len(completions) > limits.max_group:
            raise RequestError(413, f"groups[{g}].completions: {len(completions)} completions, more than "
                               f"max_group={limits.max_group} (a group costs n(n-1)/2 pairs)")
        plans.append((len(pairs), len(completions), None))
        pairs += [(prompt, completions[i], completions[j]) for i in range(len(completions))
                  for j in range(i + 1, len(completions))]

    def answer(p1: np.ndarray, p2: np.ndarray, truncated: np.ndarray) -> dict[str, Any]:
        p = (p1 + p2) / 2
        out = []
        for start, n, reference in plans:
            if reference is not None:
                out.append(_finite(p[start:start + n], "rewards"))
                continue
            wins, k = np.zeros((n, n)), start
            for i in range(n):
                for j in range(i + 1, n):
                    wins[i, j], wins[j, i] = p[k], 1.0 - p[k]
                    k += 1
            out.append(_finite(wins.sum(axis=1) / (n - 1) if n > 1 else np.full(n, 0.5), "rewards"))
        return {"rewards": out}

    texts = [t for pair in pairs for t in pair]
    return _check_size(Job(pairs, answer, texts), limits, "groups")


def best_of_n_request(body: dict, limits: ServeLimits) -> tuple[str, list[str]]:
    """POST /v1/best_of_n {"prompt", "candidates"}: the knockout of `gram rank` (n − 1 comparisons)."""
    prompt = _string("prompt", body.get("prompt"))
    candidates = _strings(body, "candidates")
    if not candidates:
        raise RequestError(422, "candidates: expected a non-empty list of strings")
    if 2 * len(candidates) > limits.max_request_rows:
        raise RequestError(413, f"candidates: {len(candidates)}, more than {limits.max_request_rows // 2} per request")
    return prompt, candidates


def exposure_error(host: str, has_token: bool, insecure: bool) -> str | None:
    """Why serving on ``host`` is refused, or None: a non-loopback address needs a token (or ``--insecure``)."""
    if has_token or insecure:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any interface
        loopback = False
    if loopback:
        return None
    return (f"--host {host} listens beyond this machine without a token: anyone who reaches the port can use "
            "the judge; pass --token-file FILE (clients send 'Authorization: Bearer <token>'), or --insecure "
            "on a network you trust")


REJECT_SLOTS = 64  # requests a full replica can hold at once just to answer them 503


def request_bounds(limits: ServeLimits) -> dict[str, int]:
    """Ray Serve's per-replica bounds: as many requests at once as can be admitted (each is at least one pair,
    two sequences) plus slots to reject the rest with our 503 + Retry-After; Ray's own queue unbounded (-1)."""
    return {"max_ongoing_requests": limits.max_queue_rows // 2 + REJECT_SLOTS, "max_queued_requests": -1}


def client_hint(url: str) -> str:
    """The flags each RL client takes, printed at start (docs/serving.md has the full commands)."""
    return (f"OpenRLHF >= 0.10.2: --reward.remote_url {url}/get_reward --data.label_key <reference column> "
            f"(before 0.10.2: --remote_rm_url, --label_key; before 0.9.1 one request is a whole rollout batch: "
            f"serve with --max-rows >= 2 x its samples)\n"
            f"TRL 1.x: GRPOTrainer(reward_funcs=[GramReward(url='{url}')]) from tasks.serving.reward_functions\n"
            f"verl 0.9: GRAM_REWARD_URL={url} with custom_reward_function.path=tasks/serving/reward_client.py "
            f"(name=compute_score, or compute_score_batch with reward_model.reward_manager=batch)")
