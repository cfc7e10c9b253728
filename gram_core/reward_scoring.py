"""The scoring operations, each defined once, for every scorer (METHOD.md section 4):

* ``pairwise``:             P(y1 ≻ y2) = ½·(P(A | y1 in A) + P(B | y1 in B)) (a scalar model: σ(r1 − r2))
* ``rewards_vs_reference``: r(x, y) = P(y ≻ y_ref)
* ``group_rewards``:        r_i = mean_{j≠i} P(y_i ≻ y_j), from the n(n−1)/2 pairs (GRPO)
* ``rank``:                 round robin over the same win matrix; ``best_of_n``: knockout, n − 1 comparisons

Every one goes through ``pairwise``, which reads a GRAM judge with ``Judge.preference`` (pair batches, the
default) or, with ``share``, with ``prob_a`` here, which computes each distinct token once. Every judge
sequence is [template + instruction] [question + prompt + A header] [response A] [B header + response B +
verdict cue]; sequences that agree on a leading part share its key/value cache:

* both slot orders of a pair share template + prompt;
* all completions of one prompt (a GRPO group, a best-of-n set) share template + prompt;
* every response scored against one reference, with the reference in slot A, shares template + prompt +
  reference (order 2 of ``rewards_vs_reference``).

``prob_a`` groups the encoded sequences by the longest such part they share, runs that part once per group
(batch 1, continuing the judge's template cache) and only the remainders in batches. Scores equal the
unshared path to float32 rounding (tests check 1e-4). Scorers are opened by ``gram_core.scorers.open_scorer``;
the MLflow pyfunc, the reward server and the TRL/verl reward functions score with ``share=True``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Sequence

import numpy as np
import torch

from gram_core.batching import pad_right
from gram_core.forward import (
    PrefixCache,
    answer_logits,
    build_prefix_cache,
    cache_kwarg,
    expanded_prefix_kwargs,
    model_parts,
)
from gram_core.judging import Judge, PairScores, _check_lengths, _EvalMode
from gram_core.report import is_correct

__all__ = ["DEFAULT_MAX_GROUP", "ScoreStats", "best_of_n", "extend_prefix", "group_rewards", "knockout", "pairwise",
           "prob_a", "rank", "reward_logit", "rewards_vs_reference"]

DEFAULT_MAX_GROUP = 16  # a group of n costs n(n−1)/2 pairs: 16 -> 120 pairs, 240 sequences
MIN_SAVED_TOKENS = 128  # a group's own prefix forward must save this many tokens, else it is pooled
LOGIT_CLIP = 1e-6  # logit(P) is finite: P is clipped to [1e-6, 1 − 1e-6] (|logit| <= 13.8)


@dataclasses.dataclass
class ScoreStats:
    """What a scoring call computed: sequences, groups, forward batches and token counts (for MFU and
    the sharing ratio: ``naive_tokens`` is what the template-only cache would have run)."""

    sequences: int = 0
    groups: int = 0
    batches: int = 0
    prefix_tokens: int = 0   # shared parts, run once per group
    suffix_tokens: int = 0   # real (unpadded) remainder tokens
    padded_tokens: int = 0   # remainder tokens including padding
    naive_tokens: int = 0    # sum of (sequence − template) lengths
    truncated: int = 0       # sequences the encoder shortened to fit max_length
    truncated_at: list[int] = dataclasses.field(default_factory=list)  # their indices in the call's input order

    def add(self, other: ScoreStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def extend_prefix(model, base: PrefixCache | None, ids: Sequence[int]) -> PrefixCache:
    """The cache of ``ids`` (which start with ``base.prefix_ids``): only the tokens after ``base`` run, batch 1,
    positions continuing after it. ``base`` stays intact (the forward concatenates into new tensors)."""
    ids = tuple(int(i) for i in ids)
    if base is None:
        return build_prefix_cache(model, ids)
    if ids[:base.length] != base.prefix_ids:
        raise ValueError("extend_prefix: ids do not start with the base prefix")
    more = ids[base.length:]
    if not more:
        return base
    decoder, _, _ = model_parts(model)
    device = decoder.get_input_embeddings().weight.device
    kwargs = expanded_prefix_kwargs(decoder, base.layers, 1)
    x = torch.tensor([list(more)], dtype=torch.long, device=device)
    positions = torch.arange(base.length, len(ids), device=device).unsqueeze(0)
    with torch.no_grad():
        decoder(input_ids=x, attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                position_ids=positions, **kwargs)
    cache = kwargs[cache_kwarg(decoder)]
    return PrefixCache(prefix_ids=ids, layers=tuple((layer.keys, layer.values) for layer in cache.layers))


def _groups(full: list[list[int]], a_starts: list[int], b_starts: list[int], template: int,
            min_saved: int) -> list[tuple[int, list[int]]]:
    """(shared length, sequence indices), first-seen order. Sequences sharing template + prompt + response A
    form a group when two or more do; the rest of a prompt's sequences share template + prompt. A group runs
    its own prefix only when that saves at least ``min_saved`` tokens ((members − 1) × its length beyond the
    template); the others are pooled behind the template alone, so unrelated one-pair requests still fill
    one forward batch together instead of one small forward each."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, seq in enumerate(full):
        by_prompt.setdefault(tuple(seq[:a_starts[i]]), []).append(i)
    groups, pool = [], []

    def place(shared: int, members: list[int]) -> None:
        if (len(members) - 1) * (shared - template) >= max(min_saved, 1):
            groups.append((shared, members))
        else:
            pool.extend(members)

    for key, members in by_prompt.items():
        by_a: dict[tuple[int, ...], list[int]] = {}
        for i in members:
            by_a.setdefault(tuple(full[i][:b_starts[i]]), []).append(i)
        rest = []
        for a_key, same_a in by_a.items():
            if len(same_a) >= 2 and len(a_key) > len(key):
                place(len(a_key), same_a)
            else:
                rest += same_a
        if rest:
            place(len(key), rest)
    return groups + ([(template, sorted(pool))] if pool else [])


def _row_batches(lengths: list[int], max_rows: int, max_tokens: int | None) -> list[list[int]]:
    """Longest first; a batch holds at most ``max_rows`` rows and ``max_tokens`` padded tokens (rows × the
    longest), always at least one row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        # Sorted longest first: the batch's first row sets its padded width.
        if batch is not None and len(batch) < max_rows and (
                max_tokens is None or (len(batch) + 1) * lengths[batch[0]] <= max_tokens):
            batch.append(i)
        else:
            batches.append([i])
    return batches


def prob_a(judge: Judge, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str],
           share: bool = True, max_rows: int | None = None, max_tokens: int | None = None,
           stats: ScoreStats | None = None, min_saved_tokens: int = MIN_SAVED_TOKENS) -> np.ndarray:
    """P(A) per sequence (float64, input order) as ``Judge.prob_a``, with shared parts run once per group.

    ``share=False`` caches only the judge's template (today's path, for comparison). Batches hold at most
    ``max_rows`` sequences (default: the judge's batch_size × 2) and ``max_tokens`` padded tokens. A shared
    part runs on its own only when it saves ``min_saved_tokens`` (an extra batch-1 forward has a fixed cost).
    """
    n = _check_lengths("prob_a", prompts=prompts, responses_a=responses_a, responses_b=responses_b)
    out = np.full(n, np.nan, dtype=np.float64)
    if n == 0:
        return out
    stats = stats if stats is not None else ScoreStats()
    encoder = judge.encoder
    template = len(encoder.prefix_ids)
    full, a_starts, b_starts = [], [], []
    for i, (x, a, b) in enumerate(zip(prompts, responses_a, responses_b, strict=True)):
        enc = encoder.encode(x, a, b, pair_id=f"#{i}")
        if enc.tokens_removed > 0:
            stats.truncated += 1
            stats.truncated_at.append(i)
        full.append(encoder.full_ids(enc))
        a_starts.append(template + enc.a_start)
        b_starts.append(template + enc.b_start)
    groups = _groups(full, a_starts, b_starts, template, min_saved_tokens) if share else [(template, list(range(n)))]
    base = judge.prefix if judge.prefix is not None else build_prefix_cache(judge.model, encoder.prefix_ids)
    rows = max_rows or 2 * judge.config.batch_size
    stats.sequences += n
    stats.groups += len(groups)
    stats.naive_tokens += sum(len(s) - template for s in full)
    with _EvalMode(judge.model):
        for shared, members in groups:
            cache = extend_prefix(judge.model, base, full[members[0]][:shared])
            stats.prefix_tokens += shared - template
            suffixes = [full[i][shared:] for i in members]
            for batch in _row_batches([len(s) for s in suffixes], rows, max_tokens):
                input_ids, mask = pad_right([suffixes[j] for j in batch], judge.pad_id)
                logits = answer_logits(judge.model, input_ids.to(judge.device), mask.to(judge.device),
                                       encoder.label_ids, prefix=cache)
                # Two-way softmax in float64: P(B) = 1 − P(A) to rounding, keeping swaps symmetric.
                out[[members[j] for j in batch]] = torch.softmax(logits.detach().double(), dim=-1)[:, 0].cpu().numpy()
                stats.batches += 1
                stats.suffix_tokens += int(mask.sum())
                stats.padded_tokens += mask.numel()
    if not np.all(np.isfinite(out)):
        raise FloatingPointError(f"prob_a: non-finite P(A) at rows {np.flatnonzero(~np.isfinite(out))[:5].tolist()}")
    return out


def pairwise(scorer, prompts: Sequence[str], responses_1: Sequence[str], responses_2: Sequence[str], *,
             progress=None, ids: Sequence[str] | None = None, share: bool | None = None, **batching) -> PairScores:
    """P(y1 ≻ y2) per pair: the one pairwise readout; every operation below and ``scorers.score_table`` use it.

    A GRAM judge (``Judge``) is read in both slot orders, in one of two batchings (the same numbers to float32
    rounding; tests check 1e-4):

    * ``share=None`` (default): ``Judge.preference``, each pair's two orders side by side (SharedJudgeForward:
      their question and A header run once), the template cached; ``progress`` and ``ids`` go to it. The
      offline path: eval tables, ``gram judge``, ``gram rank``.
    * ``share=True``: ``prob_a`` above, sequences grouped across the whole call by the longest part they share
      (a prompt's completions, a reference in slot A); ``share=False``: the same batcher, template cache only.
      ``batching``: ``max_rows``, ``max_tokens``, ``stats``, ``min_saved_tokens``. The RL path: the reward
      server, the pyfunc, the TRL/verl reward functions.

    Any other scorer (a scalar reward model, ``BTScorer``) is read with its own ``preference``: σ(r1 − r2), one
    order, so p_order1 = p_order2 = p; ``progress``, when given, hears of its sequences (a scorer whose
    ``preference(prompts, responses_1, responses_2)`` takes no ``progress`` works without one); ``share`` and
    ``batching`` do not apply and are ignored.
    """
    if not isinstance(scorer, Judge):  # a user's scorer may take no progress: pass it only when there is one
        extra = {} if progress is None else {"progress": progress}
        return scorer.preference(prompts, responses_1, responses_2, **extra)
    if share is None:
        if batching:
            raise TypeError(f"pairwise: {sorted(batching)} apply only with share=True or share=False")
        return scorer.preference(prompts, responses_1, responses_2, progress=progress, ids=ids)
    _check_lengths("pairwise", prompts=prompts, responses_1=responses_1, responses_2=responses_2)
    prompts, r1, r2 = list(prompts), list(responses_1), list(responses_2)
    return PairScores.from_orders(prob_a(scorer, prompts + prompts, r1 + r2, r2 + r1, share=share, **batching))


def rewards_vs_reference(scorer, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str],
                         **options) -> np.ndarray:
    """r(x, y) = P(y ≻ y_ref) (``pairwise``; ``options`` as there), in [0, 1]; 0.5 = as good as the reference,
    e.g. the policy's greedy response (ReMax-style). With ``share=True`` order 2 puts the reference in slot A,
    so every response to one (prompt, reference) shares that whole prefix."""
    return pairwise(scorer, prompts, responses, references, **options).p


def _win_matrix(scorer, prompt: str, candidates: Sequence[str], **options) -> np.ndarray:
    """W[i, j] = P(i ≻ j) and W[j, i] = 1 − P(i ≻ j) from the n(n−1)/2 pairs i < j in one ``pairwise`` call;
    the diagonal is 0."""
    n = len(candidates)
    wins = np.zeros((n, n))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if pairs:
        p = pairwise(scorer, [prompt] * len(pairs), [candidates[i] for i, _ in pairs],
                     [candidates[j] for _, j in pairs], **options).p
        for (i, j), p_ij in zip(pairs, p, strict=True):
            wins[i, j], wins[j, i] = p_ij, 1.0 - p_ij
    return wins


def group_rewards(scorer, prompt: str, completions: Sequence[str], max_n: int = DEFAULT_MAX_GROUP,
                  **options) -> np.ndarray:
    """GRPO group-relative rewards: r_i = mean over j ≠ i of P(y_i ≻ y_j) (``pairwise``), in [0, 1].

    Costs n(n−1)/2 pairs (n(n−1) sequences): n = 8 is 28 pairs; ``max_n`` caps it. One completion gets 0.5.
    """
    n = len(completions)
    if n > max_n:
        raise ValueError(f"group_rewards: {n} completions, more than max_n={max_n} (cost n(n-1)/2 pairs)")
    if n < 2:
        return np.full(n, 0.5)
    return _win_matrix(scorer, prompt, completions, **options).sum(axis=1) / (n - 1)


def rank(scorer, prompt: str, candidates: Sequence[str], **options) -> tuple[list[int], np.ndarray]:
    """Round-robin ranking -> (indices best first, win matrix W with W[i, j] = P(i ≻ j), 0.5 on the diagonal).

    All n(n−1)/2 pairs go through one ``pairwise`` call (fine for small n; use best_of_n for the top one).
    Candidates are ordered by their mean P(i ≻ j) over j ≠ i; ties keep the input order.
    """
    n = len(candidates)
    wins = _win_matrix(scorer, prompt, candidates, **options)
    np.fill_diagonal(wins, 0.5)
    score = (wins.sum(axis=1) - 0.5) / max(n - 1, 1)
    order = sorted(range(n), key=lambda i: -score[i])
    return order, wins


def best_of_n(scorer, prompt: str, candidates: Sequence[str], **options) -> tuple[int, int]:
    """Knockout tournament (``gram rank``) -> (index of the winner, comparisons made = n − 1).

    Each round pairs survivors (0 v 1, 2 v 3, ...) and scores all its pairs in one ``pairwise`` call; an odd
    survivor out gets a bye. The earlier candidate wins a pair iff P(earlier ≻ later) > 0.5, so on an exact
    tie the later one advances — the same strict rule as everywhere else.
    """
    rounds = knockout(len(candidates))
    try:
        pairs = next(rounds)
        while True:
            pairs = rounds.send(pairwise(scorer, [prompt] * len(pairs), [candidates[i] for i, _ in pairs],
                                         [candidates[j] for _, j in pairs], **options).p)
    except StopIteration as done:
        return done.value


def knockout(n: int) -> Generator[list[tuple[int, int]], np.ndarray, tuple[int, int]]:
    """The knockout's rounds, for any way of scoring a round (``best_of_n`` here, the reward server's batcher):
    yields each round's pairs (i, j), is sent P(i ≻ j) for them, and returns (winner, comparisons = n − 1).
    A pair's winner follows the one tie rule (``report.is_correct``); a lone survivor gets a bye. One candidate:
    returns at once, with no round to yield."""
    if n == 0:
        raise ValueError("best_of_n: no candidates")
    alive, comparisons = list(range(n)), 0
    while len(alive) > 1:
        pairs = list(zip(alive[0::2], alive[1::2], strict=False))
        p = yield pairs
        comparisons += len(pairs)
        winners = [i if won else j for (i, j), won in zip(pairs, is_correct(p), strict=True)]
        alive = winners + ([alive[-1]] if len(alive) % 2 else [])
    return alive[0], comparisons


def reward_logit(p: np.ndarray) -> np.ndarray:
    """log(P / (1 − P)) with P clipped to [LOGIT_CLIP, 1 − LOGIT_CLIP]: finite for every P in [0, 1]."""
    q = np.clip(np.asarray(p, dtype=np.float64), LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(q) - np.log1p(-q)
