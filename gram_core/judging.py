"""The GRAM judge's forward passes: P(A) per sequence and P(y1 ≻ y2) per pair (METHOD.md section 4).

P(A) for one sequence = softmax over the two verdict logits (z_A, z_B) at the answer position — never the
full vocabulary, no generation, no parsing. A pair is scored in both slot orders: order 1 puts y1 in A,
order 2 puts y1 in B, and P(y1 ≻ y2) = ½·(P(A | order 1) + P(B | order 2)) (``PairScores.from_orders``); y1
wins iff P > 0.5.

This module holds the Judge and its own pair batching; opening one from a folder is ``gram_core.scorers.
open_scorer``, and the operations built on pairs (rewards against a reference, group rewards, best-of-n,
rank) are ``gram_core.reward_scoring``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gram_core.batching import length_grouped_batches, pad_right
from gram_core.config import JudgeConfig
from gram_core.encoding import JudgeEncoder
from gram_core.forward import answer_logits, build_prefix_cache
from gram_core.rewardbench import position_consistency
from gram_core.shared_forward import SharedJudgeForward, collate_shared_judge, supports

__all__ = ["Judge", "PairScores", "position_consistency"]


# callable(done, total) counting sequences (two per pair in preference), True for a tqdm bar, or None.
Progress = Callable[[int, int], Any] | bool | None


@dataclass(frozen=True)
class PairScores:
    """P(y1 ≻ y2) per pair: from each slot order and their mean (all float64 arrays in [0, 1])."""

    p_order1: np.ndarray  # P(A) with y1 in slot A
    p_order2: np.ndarray  # P(B) with y1 in slot B
    p: np.ndarray         # mean of the two

    @classmethod
    def from_orders(cls, p_a: np.ndarray) -> PairScores:
        """The readout of P(A) for n pairs' order-1 rows followed by their order-2 rows (2n values)."""
        n = len(p_a) // 2
        p_order1 = p_a[:n]
        p_order2 = 1.0 - p_a[n:]  # P(B | order 2)
        return cls(p_order1=p_order1, p_order2=p_order2, p=(p_order1 + p_order2) / 2)


class Reporter:
    """Calls progress(done, total) after each batch, or drives a tqdm bar when progress is True."""

    def __init__(self, progress: Progress, total: int, desc: str) -> None:
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="seq")
        self.total, self.done = total, 0

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_lengths(where: str, **columns: Sequence[Any]) -> int:
    sizes = {name: len(values) for name, values in columns.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{where}: inputs must have equal lengths, got {sizes}")
    return next(iter(sizes.values()))


class Judge:
    """A pairwise A/B judge over a causal LM: one JudgeEncoder and (with reuse_prefix) one PrefixCache.

    The prefix cache holds the current weights' activations of the shared instruction: after changing the
    weights, call ``refresh_prefix()`` (or build a new Judge).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: JudgeConfig | None = None) -> None:
        config = config if config is not None else JudgeConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.encoder = JudgeEncoder(tokenizer, max_length=config.max_length, label_a=config.label_a,
                                    label_b=config.label_b, system_prompt=config.system_prompt)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("Judge: the tokenizer has neither a pad_token_id nor an eos_token_id to pad with")
        self.pad_id = int(pad)
        self.truncation = {"sequences": 0, "responses_shortened": 0, "prompts_shortened": 0, "tokens_removed": 0}
        self.prefix = None
        self.shared: SharedJudgeForward | None = None  # both orders of a pair share their prompt (preference)
        self.refresh_prefix()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def refresh_prefix(self) -> None:
        """(Re)build the shared-prefix cache from the current weights, once, in eval mode without grad."""
        if not self.config.reuse_prefix:
            self.prefix = self.shared = None
            return
        with self._eval():
            self.prefix = build_prefix_cache(self.model, self.encoder.prefix_ids)
            if supports(self.model):
                self.shared = SharedJudgeForward(self.encoder.prefix_ids, self.encoder.label_ids)
                self.shared.begin(self.model)  # the instruction's keys/values, once, for every batch

    def _eval(self) -> _EvalMode:
        return _EvalMode(self.model)

    def _encode(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str],
                ids: Sequence[str] | None) -> list[list[int]]:
        seqs = []
        names = ids if ids is not None else [f"#{i}" for i in range(len(prompts))]
        for prompt, a, b, name in zip(prompts, responses_a, responses_b, names, strict=True):
            enc = self.encoder.encode(prompt, a, b, pair_id=str(name))
            self.truncation["sequences"] += 1
            self.truncation["responses_shortened"] += enc.responses_shortened
            self.truncation["prompts_shortened"] += int(enc.prompt_shortened)
            self.truncation["tokens_removed"] += enc.tokens_removed
            # Without a cached prefix the model sees the whole sequence in one forward.
            seqs.append(list(enc.suffix_ids) if self.prefix is not None else self.encoder.full_ids(enc))
        return seqs

    def prob_a(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str],
               progress: Progress = None, ids: Sequence[str] | None = None) -> np.ndarray:
        """P(A) per sequence = softmax(z_A, z_B)[A] at the answer position, float64, in input order.

        ``ids`` name the rows in encoding errors (default: their positions).
        """
        n = _check_lengths("Judge.prob_a", prompts=prompts, responses_a=responses_a, responses_b=responses_b)
        out = np.full(n, np.nan, dtype=np.float64)
        if n == 0:
            return out
        seqs = self._encode(prompts, responses_a, responses_b, ids)
        # Deterministic length grouping (no shuffle): little padding, and the last batch may be partial.
        batches = length_grouped_batches([len(s) for s in seqs], self.config.batch_size, seed=0, shuffle=False)
        reporter = Reporter(progress, n, "judging")
        try:
            with self._eval():
                for batch in batches:
                    input_ids, mask = pad_right([seqs[i] for i in batch], self.pad_id)
                    logits = answer_logits(self.model, input_ids.to(self.device), mask.to(self.device),
                                           self.encoder.label_ids, prefix=self.prefix)
                    # Two-way softmax in float64: P(B) = 1 − P(A) to rounding, keeping swaps symmetric.
                    probs = torch.softmax(logits.detach().double(), dim=-1)[:, 0]
                    out[batch] = probs.cpu().numpy()
                    reporter.update(len(batch))
        finally:
            reporter.close()
        return out

    def preference(self, prompts: Sequence[str], responses_1: Sequence[str], responses_2: Sequence[str],
                   progress: Progress = None, ids: Sequence[str] | None = None) -> PairScores:
        """P(y1 ≻ y2) = ½·(P(A | y1 in A) + P(B | y1 in B)); both orders go through one batched call, each pair's
        two orders side by side (``reward_scoring.pairwise``'s default batching; its ``share`` groups across pairs)."""
        n = _check_lengths("Judge.preference", prompts=prompts, responses_1=responses_1, responses_2=responses_2)
        prompts, r1, r2 = list(prompts), list(responses_1), list(responses_2)
        names = [str(i) for i in ids] if ids is not None else [f"#{i}" for i in range(n)]
        names = [f"{x} (order 1)" for x in names] + [f"{x} (order 2)" for x in names]
        # A pair's two orders in one batch (batch_size >= 2); a subclass with its own prob_a keeps it.
        if getattr(self, "shared", None) is not None and n and self.config.batch_size >= 2:
            p_a = self._prob_a_pairs(prompts, r1, r2, names, progress)
        else:
            p_a = self.prob_a(prompts + prompts, r1 + r2, r2 + r1, progress=progress, ids=names)
        return PairScores.from_orders(p_a)

    def _prob_a_pairs(self, prompts: list[str], r1: list[str], r2: list[str], names: list[str],
                      progress: Progress) -> np.ndarray:
        """``prob_a`` of both orders (order 1 rows, then order 2 rows), each pair's two orders in one batch so
        that the question and the A header they share run once (gram_core.shared_forward; same numbers)."""
        n = len(prompts)
        seqs = self._encode(prompts + prompts, r1 + r2, r2 + r1, names)
        collate = collate_shared_judge(self.pad_id)
        pair_batches = length_grouped_batches([max(len(seqs[i]), len(seqs[n + i])) for i in range(n)],
                                              self.config.batch_size // 2, seed=0, shuffle=False)
        out = np.full(2 * n, np.nan, dtype=np.float64)
        reporter = Reporter(progress, 2 * n, "judging")
        try:
            with self._eval():
                for pairs in pair_batches:
                    rows = [r for i in pairs for r in (i, n + i)]
                    batch = collate([{"pair_id": i, "suffix_ids": seqs[r]} for i in pairs for r in (i, n + i)])
                    batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    logits = self.shared.logits(self.model, batch)
                    out[rows] = torch.softmax(logits.detach().double(), dim=-1)[:, 0].cpu().numpy()
                    reporter.update(len(rows))
        finally:
            reporter.close()
        return out


class _EvalMode:
    """Eval mode and no grad for the duration of a block; restores the model's previous training flag."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)
