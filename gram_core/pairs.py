"""Build stage-1 unlabeled pairs from a response pool (METHOD.md section 2: two responses to the same
prompt, in arbitrary order, labels ignored).

Rules, per prompt_id: responses shorter than ``min_chars`` are left out; a pair never holds two texts that
are equal after whitespace normalization; with ``distinct_generators`` both responses come from different
generators; a pair of texts appears once (whitespace variants count as the same text). Up to
``max_pairs_per_prompt`` pairs are drawn per prompt and the slot order (A/B) is randomised, both from a
generator seeded by (seed, prompt_id), so a prompt's pairs do not depend on the rest of the pool.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pyarrow as pa

from data_contracts import UNLABELED_PAIRS
from gram_core.config import check, field

UNLABELED_PAIRS_COLUMNS = tuple(UNLABELED_PAIRS.schema.names)
POOL_COLUMNS = ("prompt_id", "prompt", "response", "generator")


@dataclasses.dataclass(frozen=True)
class PairingConfig:
    max_pairs_per_prompt: int = field(4, "Pairs drawn per prompt (seeded, without replacement); 0 = all "
                                      "eligible pairs.")
    distinct_generators: bool = field(True, "Pair only responses from different generators.")
    seed: int = field(0, "Seed for choosing pairs and their A/B order (combined with each prompt_id).")
    min_chars: int = field(1, "Responses with fewer characters (after whitespace normalization) are not paired.")

    def __post_init__(self) -> None:
        check(self.max_pairs_per_prompt >= 0, "pairing.max_pairs_per_prompt",
              f"must be >= 0 (0 = all), got {self.max_pairs_per_prompt}")
        check(self.min_chars >= 1, "pairing.min_chars", f"must be >= 1, got {self.min_chars}")


def normalize_whitespace(text: str) -> str:
    """Collapse every whitespace run to one space and strip the ends (the identity used for 'identical')."""
    return " ".join(text.split())


def pair_id(prompt_id: str, response_1: str, response_2: str) -> str:
    """Stable id of an unordered pair: first 16 hex of SHA-256 over prompt_id and both texts, sorted."""
    low, high = sorted((response_1, response_2))
    return hashlib.sha256("\x1f".join((prompt_id, low, high)).encode("utf-8")).hexdigest()[:16]


def _prompt_rng(seed: int, prompt_id: str) -> np.random.Generator:
    digest = hashlib.sha256(prompt_id.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _columns(pool: pa.Table, source_name: str | None) -> dict[str, list]:
    """The pool columns as Python lists, checking presence and nulls (errors name the column and rows)."""
    needed = POOL_COLUMNS + (() if source_name else ("source",))
    missing = [c for c in needed if c not in pool.column_names]
    if missing:
        raise ValueError(f"response pool is missing column(s) {missing}; it has {pool.column_names} "
                         f"(expected the response-pool contract {list(POOL_COLUMNS) + ['source']})")
    out = {}
    for name in needed:
        values = pool[name].to_pylist()
        nulls = [i for i, v in enumerate(values) if v is None]
        if nulls:
            raise ValueError(f"response pool column {name!r} has nulls at rows {nulls[:10]}")
        out[name] = values
    return out


def _candidates(texts: np.ndarray, gens: np.ndarray, distinct_generators: bool) -> tuple[np.ndarray, ...]:
    """Eligible index pairs (i < j) inside one prompt's group, plus the drop counts per reason."""
    if len(texts) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, 0, 0, 0
    i, j = np.triu_indices(len(texts), k=1)
    identical = texts[i] == texts[j]
    same_gen = (gens[i] == gens[j]) & ~identical if distinct_generators else np.zeros_like(identical)
    keep = ~identical & ~same_gen
    i, j = i[keep], j[keep]
    # One pair per pair of distinct texts: key = (smaller text id, larger text id); keep first occurrence.
    low, high = np.minimum(texts[i], texts[j]), np.maximum(texts[i], texts[j])
    _, first = np.unique(low * (texts.max() + 1) + high, return_index=True)
    first.sort()
    duplicates = len(i) - len(first)
    return i[first], j[first], int(identical.sum()), int(same_gen.sum()), duplicates


def _check_one_prompt_per_id(prompt_ids: list[str], prompts: list[str]) -> None:
    prompt_of: dict[str, str] = {}
    for row, (pid, prompt) in enumerate(zip(prompt_ids, prompts, strict=True)):
        if prompt_of.setdefault(pid, prompt) != prompt:
            raise ValueError(f"response pool row {row}: prompt_id {pid!r} has two different prompts "
                             f"({prompt_of[pid][:60]!r} and {prompt[:60]!r}); expected one prompt per id")


def build_pairs(pool: pa.Table, config: PairingConfig = PairingConfig(),
                source_name: str | None = None) -> tuple[pa.Table, dict[str, int]]:
    """Pair responses to the same prompt. Returns (unlabeled-pairs table, stats). ``source`` is
    ``source_name`` when given, else the pool's source of the response placed in slot A.

    stats: prompts, pairs, candidate_pairs (eligible before the per-prompt cap), dropped_identical,
    dropped_same_generator, dropped_duplicate (whitespace variants of an already-eligible pair),
    dropped_short (responses), prompts_without_pair.
    """
    cols = _columns(pool, source_name)
    normalized = [normalize_whitespace(r) for r in cols["response"]]
    short = np.array([len(t) < config.min_chars for t in normalized], dtype=bool)

    # Integer codes: groups in order of first appearance; texts and generators by value.
    group_codes: dict[str, int] = {}
    group = np.array([group_codes.setdefault(p, len(group_codes)) for p in cols["prompt_id"]], dtype=np.int64)
    text_codes: dict[str, int] = {}
    text = np.array([text_codes.setdefault(t, len(text_codes)) for t in normalized], dtype=np.int64)
    gen_codes: dict[str, int] = {}
    gen = np.array([gen_codes.setdefault(g, len(gen_codes)) for g in cols["generator"]], dtype=np.int64)

    _check_one_prompt_per_id(cols["prompt_id"], cols["prompt"])
    stats = dict(prompts=len(group_codes), pairs=0, candidate_pairs=0, dropped_identical=0,
                 dropped_same_generator=0, dropped_duplicate=0, dropped_short=int(short.sum()),
                 prompts_without_pair=0)
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(len(group_codes) + 1))
    pids = list(group_codes)
    slot_a: list[int] = []
    slot_b: list[int] = []
    for g, pid in enumerate(pids):
        rows = order[bounds[g]:bounds[g + 1]]
        rows = rows[~short[rows]]
        i, j, n_identical, n_same, n_dup = _candidates(text[rows], gen[rows], config.distinct_generators)
        stats["dropped_identical"] += n_identical
        stats["dropped_same_generator"] += n_same
        stats["dropped_duplicate"] += n_dup
        stats["candidate_pairs"] += len(i)
        if len(i) == 0:
            stats["prompts_without_pair"] += 1
            continue
        rng = _prompt_rng(config.seed, pid)
        if config.max_pairs_per_prompt and len(i) > config.max_pairs_per_prompt:
            pick = rng.choice(len(i), size=config.max_pairs_per_prompt, replace=False)
            i, j = i[pick], j[pick]
        swap = rng.random(len(i)) < 0.5  # which response goes to slot A
        slot_a += rows[np.where(swap, j, i)].tolist()
        slot_b += rows[np.where(swap, i, j)].tolist()

    responses, prompt_ids = cols["response"], cols["prompt_id"]
    out = {
        "pair_id": [pair_id(prompt_ids[a], responses[a], responses[b]) for a, b in zip(slot_a, slot_b, strict=True)],
        "prompt": [cols["prompt"][a] for a in slot_a],
        "response_a": [responses[a] for a in slot_a],
        "response_b": [responses[b] for b in slot_b],
        "source": [source_name or cols["source"][a] for a in slot_a],
    }
    stats["pairs"] = len(slot_a)
    return pa.Table.from_pydict(out, schema=UNLABELED_PAIRS.schema), stats
