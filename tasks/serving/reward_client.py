"""A thin client of `gram serve` for RL frameworks: the standard library only (no torch, no gram_core on import).

* ``GramServerClient``: POST JSON, retry 503 (and 429, which `gram serve` does not send but a proxy may) after
  Retry-After, split /v1/grpo requests under the server's per-request cap of ``max_rows`` judge sequences.
* verl 0.9 (``custom_reward_function.path`` = this file):
  ``compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float`` for the naive
  reward manager, and ``compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, **kwargs)
  -> list[float]`` for ``reward_model.reward_manager=batch`` (one request per batch, not one per sample).
  Both read P(solution ≻ ground_truth) from the server at ``GRAM_REWARD_URL`` (bearer token in
  ``GRAM_REWARD_TOKEN``), or without it score in process with ``GRAM_REWARD_MODEL`` (that path imports torch).
  The prompt is ``extra_info["question"]`` or ``extra_info["prompt"]``; without either they raise, since a
  reward without the question is not the judge's reward.

verl loads the file by path, so it imports nothing of this repository at module level.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["GramServerClient", "compute_score", "compute_score_batch", "group_cost", "message_text"]

DEFAULT_MAX_ROWS = 512  # `gram serve --max-batch`'s default: judge sequences per request


def message_text(value: Any, role: str | None = None) -> str:
    """The text of a prompt or completion: a string, or a conversation (list of {role, content}) whose last
    message of ``role`` (any role when None) is taken."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        picked = [m for m in value if role is None or m.get("role") == role] or value
        content = picked[-1].get("content", "") if picked else ""
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    raise TypeError(f"expected a string or a list of chat messages, got {type(value).__name__}")


def group_cost(group: dict) -> int:
    """Judge sequences of one /v1/grpo group: 2 per completion with a reference, n(n−1) without."""
    n = len(group["completions"])
    return 2 * n if group.get("reference") is not None else n * (n - 1)


def _chunks(groups: list[dict], max_rows: int) -> list[list[tuple[int, int, dict]]]:
    """Requests of at most ``max_rows`` sequences: (group index, first completion, part of the group). A group
    with a reference splits by completions; a group-relative one is indivisible (the server caps its size)."""
    requests: list[list[tuple[int, int, dict]]] = [[]]
    used = 0
    for g, group in enumerate(groups):
        parts = [(0, group)]
        if group.get("reference") is not None and group_cost(group) > max_rows:
            step = max(1, max_rows // 2)
            parts = [(at, dict(group, completions=group["completions"][at:at + step]))
                     for at in range(0, len(group["completions"]), step)]
        for at, part in parts:
            cost = group_cost(part)
            if requests[-1] and used + cost > max_rows:
                requests.append([])
                used = 0
            requests[-1].append((g, at, part))
            used += cost
    return [r for r in requests if r]


class GramServerClient:
    """POST JSON to a `gram serve` URL; retries 429/503 and connection errors after Retry-After (or 1 s)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 180, tries: int = 5,
                 max_rows: int = DEFAULT_MAX_ROWS, parallel: int = 4):
        self.url, self.token, self.timeout_s, self.tries = url.rstrip("/"), token, timeout_s, tries
        self.max_rows, self.parallel = max_rows, parallel

    def post(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.token}"}
                                                           if self.token else {})}
        last: Exception | None = None
        for _ in range(self.tries):
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as err:
                reason = err.read().decode(errors="replace")[:300]
                if err.code not in (429, 503):
                    raise RuntimeError(f"{self.url}{path}: HTTP {err.code}: {reason}") from None
                last = RuntimeError(f"{self.url}{path}: HTTP {err.code}: {reason}")
                time.sleep(float(err.headers.get("Retry-After") or 1))
            except OSError as err:  # connection refused or reset: the server may be starting
                last = err
                time.sleep(1)
        raise RuntimeError(f"{self.url}{path}: no answer after {self.tries} tries ({last})")

    def group_rewards(self, groups: list[dict]) -> list[list[float]]:
        """POST /v1/grpo: one reward list per group {prompt, completions[, reference]}, in requests of at most
        ``max_rows`` sequences (sent ``parallel`` at a time; the server batches them together)."""
        requests = _chunks(groups, self.max_rows)
        rewards: list[list[float]] = [[0.0] * len(g["completions"]) for g in groups]

        def send(request: list[tuple[int, int, dict]]) -> list[list[float]]:
            return self.post("/v1/grpo", {"groups": [part for _, _, part in request]})["rewards"]

        with ThreadPoolExecutor(max(1, min(self.parallel, len(requests)))) as pool:
            for request, answer in zip(requests, pool.map(send, requests), strict=True):
                for (g, at, _), values in zip(request, answer, strict=True):
                    rewards[g][at:at + len(values)] = [float(v) for v in values]
        return rewards


def _question(extra_info: Any, where: str) -> str:
    info = extra_info if isinstance(extra_info, dict) else {}
    question = info.get("question") or info.get("prompt")
    if not question:
        raise ValueError(f"{where}: extra_info has no 'question' (or 'prompt'); keys: {sorted(info)}. The judge "
                         "compares answers to a question: put the question in extra_info when preparing the "
                         "verl parquet (e.g. extra_info={'question': question})")
    return message_text(question, "user")


def _scores(prompts: list[str], solutions: list[str], references: list[str]) -> list[float]:
    url = os.environ.get("GRAM_REWARD_URL")
    if url:
        client = GramServerClient(url, os.environ.get("GRAM_REWARD_TOKEN"))
        groups = [{"prompt": p, "completions": [s], "reference": r}
                  for p, s, r in zip(prompts, solutions, references, strict=True)]
        return [values[0] for values in client.group_rewards(groups)]
    model = os.environ.get("GRAM_REWARD_MODEL")
    if not model:
        raise RuntimeError("compute_score: set GRAM_REWARD_URL (a `gram serve` server) or GRAM_REWARD_MODEL "
                           "(a judge folder, .gguf, smollm2 or tiny, scored in process)")
    from tasks.serving.local_judge import local_rewards_vs_reference  # torch and the judge: only on this path

    return local_rewards_vs_reference(model, prompts, solutions, references)


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  **kwargs: Any) -> float:
    """verl's naive reward manager: P(solution ≻ ground_truth) in [0, 1] (0.5 = as good as the reference).
    Extra keyword arguments (verl's reward_kwargs, the reward loop's own) are accepted and unused."""
    return _scores([_question(extra_info, "compute_score")], [solution_str], [str(ground_truth)])[0]


def compute_score_batch(data_sources: Sequence[str], solution_strs: Sequence[str], ground_truths: Sequence[str],
                        extra_infos: Sequence[dict | None], **kwargs: Any) -> list[float]:
    """verl's batch reward manager: ``compute_score`` for a whole batch in one request (split only under the
    server's row cap)."""
    prompts = [_question(info, f"compute_score_batch: item {i}") for i, info in enumerate(extra_infos)]
    return _scores(prompts, list(solution_strs), [str(g) for g in ground_truths])
