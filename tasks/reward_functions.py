"""The GRAM judge in the reward-function shapes of RL frameworks, scored by a `gram serve` server or in process.

* TRL ``GRPOTrainer(reward_funcs=[GramReward(...)])``: ``(prompts, completions, **columns) -> list[float]``.
  ``mode="group"``: each completion's mean P(win) against the other completions of its prompt (both slot
  orders; n(n−1)/2 pairs per group of n). ``mode="reference"``: P(completion ≻ the dataset's reference column).
* verl ``custom_reward_function.path=<this file>``, ``name=compute_score``:
  ``compute_score(data_source, solution_str, ground_truth, extra_info) -> float`` = P(solution ≻ ground_truth),
  from the server at ``GRAM_REWARD_URL`` (bearer token in ``GRAM_REWARD_TOKEN``) or, without it, the judge
  ``GRAM_REWARD_MODEL`` (any MODEL `gram judge` takes that is a folder, .gguf, smollm2 or tiny) in process.

Over HTTP, 429/503 answers are retried after their Retry-After (like OpenRLHF's client, 5 tries by default).
"""

from __future__ import annotations

import functools
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from gram_core.reward_scoring import DEFAULT_MAX_GROUP, group_rewards, rewards_vs_reference

__all__ = ["GramReward", "GramServerClient", "compute_score", "message_text"]


def message_text(value: Any, role: str | None = None) -> str:
    """The text of a TRL prompt or completion: a string, or a conversation (list of {role, content}) whose last
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


class GramServerClient:
    """POST JSON to a `gram serve` URL; retries 429/503 and connection errors after Retry-After (or 1 s)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 180, tries: int = 5):
        self.url, self.token, self.timeout_s, self.tries = url.rstrip("/"), token, timeout_s, tries

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
        """POST /v1/grpo: one reward list per group {prompt, completions[, reference]}."""
        return self.post("/v1/grpo", {"groups": groups})["rewards"]


def _groups_by_prompt(prompts: Sequence[str]) -> list[list[int]]:
    """Indices of equal prompts, in first-seen order (GRPO repeats each prompt num_generations times)."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    return list(groups.values())


class GramReward:
    """A TRL GRPOTrainer reward function backed by a GRAM judge (``url`` of `gram serve`, or ``judge``)."""

    def __init__(self, url: str | None = None, judge: Any = None, mode: str = "group",
                 reference_column: str = "reference", token: str | None = None, max_group: int = DEFAULT_MAX_GROUP):
        if (url is None) == (judge is None):
            raise ValueError("GramReward: pass exactly one of url (a `gram serve` server) or judge (in process)")
        if mode not in ("group", "reference"):
            raise ValueError(f"GramReward: mode must be 'group' or 'reference', got {mode!r}")
        self.client = GramServerClient(url, token) if url else None
        self.judge, self.mode, self.reference_column, self.max_group = judge, mode, reference_column, max_group
        self.__name__ = f"gram_{mode}"  # TRL logs each reward function under its __name__

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        prompt_texts = [message_text(p, "user") for p in prompts]
        texts = [message_text(c, "assistant") for c in completions]
        rewards = [0.0] * len(texts)
        if self.mode == "reference":
            if self.reference_column not in columns:
                raise KeyError(f"GramReward(mode='reference'): the dataset has no column {self.reference_column!r}; "
                               f"columns passed: {sorted(columns)}")
            references = [message_text(r, "assistant") for r in columns[self.reference_column]]
            groups = [[i] for i in range(len(texts))]
            specs = [{"prompt": prompt_texts[i], "completions": [texts[i]], "reference": references[i]}
                     for i in range(len(texts))]
        else:
            groups = _groups_by_prompt(prompt_texts)
            specs = [{"prompt": prompt_texts[g[0]], "completions": [texts[i] for i in g]} for g in groups]
        for members, values in zip(groups, self._score(specs), strict=True):
            for i, value in zip(members, values, strict=True):
                rewards[i] = float(value)
        return rewards

    def _score(self, specs: list[dict]) -> list[list[float]]:
        if self.client is not None:
            return self.client.group_rewards(specs)
        if self.mode == "reference":
            p = rewards_vs_reference(self.judge, [s["prompt"] for s in specs], [s["completions"][0] for s in specs],
                                     [s["reference"] for s in specs])
            return [[float(v)] for v in p]
        return [group_rewards(self.judge, s["prompt"], s["completions"], max_n=self.max_group).tolist()
                for s in specs]


@functools.lru_cache(maxsize=1)
def _local_judge(model: str) -> Any:
    from gram_core.config import JudgeConfig
    from gram_core.models import resolve_model_source
    from gram_core.scorers import load_scorer

    return load_scorer(resolve_model_source(model), JudgeConfig())


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """verl's reward-function shape: P(solution ≻ ground_truth), the reference, in [0, 1] (0.5 = as good).

    The prompt is ``extra_info['question']`` or ``extra_info['prompt']`` when the dataset put it there.
    """
    info = extra_info or {}
    prompt = message_text(info.get("question") or info.get("prompt") or "", "user")
    url = os.environ.get("GRAM_REWARD_URL")
    if url:
        client = GramServerClient(url, os.environ.get("GRAM_REWARD_TOKEN"))
        return float(client.group_rewards([{"prompt": prompt, "completions": [solution_str],
                                            "reference": str(ground_truth)}])[0][0])
    model = os.environ.get("GRAM_REWARD_MODEL")
    if not model:
        raise RuntimeError("compute_score: set GRAM_REWARD_URL (a `gram serve` server) or GRAM_REWARD_MODEL "
                           "(a judge folder, .gguf, smollm2 or tiny, scored in process)")
    return float(rewards_vs_reference(_local_judge(model), [prompt], [solution_str], [str(ground_truth)])[0])
