"""The GRAM judge in the reward-function shapes of RL frameworks, scored by a `gram serve` server or in process.

* TRL ``GRPOTrainer(reward_funcs=[GramReward(...)])``: ``(prompts, completions, **columns) -> list[float]``.
  ``mode="group"``: each completion's mean P(win) against the other completions of its prompt (both slot
  orders; n(n−1)/2 pairs per group of n). ``mode="reference"``: P(completion ≻ the dataset's reference column).
  On several processes TRL may spread one prompt's completions across ranks; group mode then gathers the
  whole groups from every rank (torch.distributed), scores each group once on one rank and hands every rank
  its own rewards, so group-relative rewards are those of the whole group.
* verl: ``compute_score`` / ``compute_score_batch`` live in tasks/serving/reward_client.py (no torch on import) and
  are re-exported here.

Over HTTP, requests stay under the server's row cap (``max_rows``, `gram serve --max-batch`) and 503 answers
are retried after their Retry-After (like OpenRLHF's client, 5 tries by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gram_core.reward_scoring import DEFAULT_MAX_GROUP, group_rewards, rewards_vs_reference
from tasks.serving.reward_client import (
    DEFAULT_MAX_ROWS,
    GramServerClient,
    compute_score,
    compute_score_batch,
    message_text,
)

__all__ = ["GramReward", "GramServerClient", "compute_score", "compute_score_batch", "message_text"]


def _groups_by_prompt(prompts: Sequence[str]) -> list[list[int]]:
    """Indices of equal prompts, in first-seen order (GRPO repeats each prompt num_generations times)."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    return list(groups.values())


class GramReward:
    """A TRL GRPOTrainer reward function backed by a GRAM judge (``url`` of `gram serve`, or ``judge``)."""

    def __init__(self, url: str | None = None, judge: Any = None, mode: str = "group",
                 reference_column: str = "reference", token: str | None = None, max_group: int = DEFAULT_MAX_GROUP,
                 max_rows: int = DEFAULT_MAX_ROWS):
        if (url is None) == (judge is None):
            raise ValueError("GramReward: pass exactly one of url (a `gram serve` server) or judge (in process)")
        if mode not in ("group", "reference"):
            raise ValueError(f"GramReward: mode must be 'group' or 'reference', got {mode!r}")
        self.client = GramServerClient(url, token, max_rows=max_rows) if url else None
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
            dist = _distributed()
            if dist is not None:
                return self._gathered_groups(dist, prompt_texts, texts)
            groups = _groups_by_prompt(prompt_texts)
            specs = [{"prompt": prompt_texts[g[0]], "completions": [texts[i] for i in g]} for g in groups]
        for members, values in zip(groups, self._score(specs), strict=True):
            for i, value in zip(members, values, strict=True):
                rewards[i] = float(value)
        return rewards

    def _gathered_groups(self, dist: Any, prompt_texts: list[str], texts: list[str]) -> list[float]:
        """Group mode on several ranks: every rank's (prompt, completion) gathered, the groups of the whole
        batch split among ranks, each scored once, and the rewards gathered back; this rank's slice returned."""
        world, rank = dist.get_world_size(), dist.get_rank()
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (prompt_texts, texts))
        offsets = [0]
        for part_prompts, _ in parts:
            offsets.append(offsets[-1] + len(part_prompts))
        all_prompts = [p for part_prompts, _ in parts for p in part_prompts]
        all_texts = [t for _, part_texts in parts for t in part_texts]
        mine = [g for k, g in enumerate(_groups_by_prompt(all_prompts)) if k % world == rank]
        specs = [{"prompt": all_prompts[g[0]], "completions": [all_texts[i] for i in g]} for g in mine]
        scored = {i: float(v) for members, values in zip(mine, self._score(specs) if specs else [], strict=True)
                  for i, v in zip(members, values, strict=True)}
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, scored)
        merged = {i: v for part in everyone for i, v in part.items()}
        return [merged[i] for i in range(offsets[rank], offsets[rank + 1])]

    def _score(self, specs: list[dict]) -> list[list[float]]:
        if self.client is not None:
            return self.client.group_rewards(specs)
        if self.mode == "reference":
            p = rewards_vs_reference(self.judge, [s["prompt"] for s in specs], [s["completions"][0] for s in specs],
                                     [s["reference"] for s in specs], share=True)
            return [[float(v)] for v in p]
        return [group_rewards(self.judge, s["prompt"], s["completions"], max_n=self.max_group, share=True).tolist()
                for s in specs]


def _distributed() -> Any:
    """torch.distributed when this process is one of several initialized ranks (TRL under accelerate), else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None
