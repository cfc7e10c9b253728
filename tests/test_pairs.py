"""Pair building: distinct generators, no identical texts, per-prompt cap, seeded order, stable ids."""

import itertools
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gram_core.config import ConfigError
from gram_core.pairs import PairingConfig, build_pairs, normalize_whitespace, pair_id
from gram_core.sampling import prompt_id


def _pool(rows):
    """rows: (prompt, response, generator)."""
    return pa.table({
        "prompt_id": [prompt_id(p) for p, _, _ in rows],
        "prompt": [p for p, _, _ in rows],
        "response": [r for _, r, _ in rows],
        "generator": [g for _, _, g in rows],
        "source": ["hand"] * len(rows),
    })


POOL = _pool([
    ("Q1", "alpha", "g1"), ("Q1", "beta", "g2"), ("Q1", "gamma", "g2"), ("Q1", " alpha \n", "g3"),
    ("Q2", "one", "g1"), ("Q2", "two", "g1"),
    ("Q3", "solo", "g1"),
    ("Q4", "x", "g1"), ("Q4", "y", "g2"), ("Q4", "z", "g3"), ("Q4", "w", "g4"),
])


def _pairs(table):
    return [(r["prompt"], frozenset((r["response_a"], r["response_b"]))) for r in table.to_pylist()]


def test_rules_on_a_hand_made_pool():
    table, stats = build_pairs(POOL, PairingConfig(max_pairs_per_prompt=0), source_name="hand-pairs")
    got = _pairs(table)
    # Q1: "alpha" and " alpha \n" are identical after normalization; beta/gamma share generator g2;
    # (alpha, beta) and (" alpha \n", beta) are the same pair of texts, kept once; Q2 shares g1.
    q1 = {p for q, p in got if q == "Q1"}
    assert q1 == {frozenset(("alpha", "beta")), frozenset(("alpha", "gamma"))}
    # Q2 has one generator only, Q3 one response: no pairs. Q4: all 6 pairs of 4 generators.
    assert {q for q, _ in got} == {"Q1", "Q4"}
    assert sum(q == "Q4" for q, _ in got) == 6
    assert stats == {"prompts": 4, "pairs": 8, "candidate_pairs": 8, "dropped_identical": 1,
                     "dropped_same_generator": 2, "dropped_duplicate": 2, "dropped_short": 0,
                     "prompts_without_pair": 2}
    assert set(table.column("source").to_pylist()) == {"hand-pairs"}
    assert table.column_names == ["pair_id", "prompt", "response_a", "response_b", "source"]


def test_same_generator_pairs_allowed_when_not_required():
    table, stats = build_pairs(POOL, PairingConfig(max_pairs_per_prompt=0, distinct_generators=False))
    assert frozenset(("one", "two")) in {p for q, p in _pairs(table) if q == "Q2"}
    assert stats["dropped_same_generator"] == 0 and stats["prompts_without_pair"] == 1
    assert set(table.column("source").to_pylist()) == {"hand"}  # taken from the pool


def test_cap_per_prompt_and_determinism():
    cfg = PairingConfig(max_pairs_per_prompt=2, seed=3)
    first, _ = build_pairs(POOL, cfg)
    again, _ = build_pairs(POOL, cfg)
    assert first.equals(again)
    per_prompt = {q: sum(1 for x, _ in _pairs(first) if x == q) for q in ("Q1", "Q4")}
    assert per_prompt == {"Q1": 2, "Q4": 2}
    # A prompt's pairs depend only on its own rows, not on the rest of the pool.
    only_q4, _ = build_pairs(POOL.filter(pa.compute.equal(POOL["prompt"], "Q4")), cfg)
    assert only_q4.to_pylist() == [r for r in first.to_pylist() if r["prompt"] == "Q4"]
    # Another seed draws other pairs or orders for Q4 (6 pairs, 2 drawn, 2 orders each).
    seeds = {tuple((r["response_a"], r["response_b"]) for r in build_pairs(POOL, PairingConfig(2, seed=s))[0]
                   .to_pylist() if r["prompt"] == "Q4") for s in range(6)}
    assert len(seeds) > 1


def test_slot_order_is_randomised_and_pair_id_ignores_order():
    rows = [("Q", f"response {i}", f"g{i}") for i in range(12)]
    table, _ = build_pairs(_pool(rows), PairingConfig(max_pairs_per_prompt=0, seed=0))
    a_first = [int(r["response_a"].split()[1]) < int(r["response_b"].split()[1]) for r in table.to_pylist()]
    assert 0.3 < sum(a_first) / len(a_first) < 0.7  # 66 pairs, seeded: not all in pool order
    for r in table.to_pylist():
        assert r["pair_id"] == pair_id(prompt_id("Q"), r["response_b"], r["response_a"])
    assert len(set(table.column("pair_id").to_pylist())) == 66


def test_min_chars_and_errors():
    pool = _pool([("Q", "ok", "g1"), ("Q", "a much longer answer", "g2"), ("Q", "another long one", "g3")])
    table, stats = build_pairs(pool, PairingConfig(max_pairs_per_prompt=0, min_chars=5))
    assert _pairs(table) == [("Q", frozenset(("a much longer answer", "another long one")))]
    assert stats["dropped_short"] == 1
    with pytest.raises(ValueError, match=r"missing column\(s\) \['generator'\]"):
        build_pairs(pool.drop_columns(["generator"]))
    clash = pool.set_column(1, "prompt", pa.array(["Q", "Q", "other"]))
    with pytest.raises(ValueError, match="row 2: prompt_id .* has two different prompts"):
        build_pairs(clash)
    with pytest.raises(ConfigError, match="pairing.max_pairs_per_prompt"):
        PairingConfig(max_pairs_per_prompt=-1)


def test_validates_against_unlabeled_pairs_contract():
    import data_contracts as dc
    table, _ = build_pairs(POOL, PairingConfig(max_pairs_per_prompt=0))
    assert dc.validate(table, dc.UNLABELED_PAIRS).num_rows == 8


def test_on_shared_response_pool_sample(shared_data):
    pool = pq.read_table(shared_data / "response_pool.parquet")
    sample = pool.take(sorted(random.Random(0).sample(range(pool.num_rows), 2000)))
    table, stats = build_pairs(sample, PairingConfig(max_pairs_per_prompt=3, seed=0))
    rows = table.to_pylist()
    assert stats["pairs"] == len(rows) > 300
    generator_of = {(r["prompt_id"], r["response"]): r["generator"] for r in sample.to_pylist()}
    for r in rows:
        assert normalize_whitespace(r["response_a"]) != normalize_whitespace(r["response_b"])
        pid = prompt_id(r["prompt"])
        assert generator_of[(pid, r["response_a"])] != generator_of[(pid, r["response_b"])]
    by_prompt = {p: len(list(g)) for p, g in itertools.groupby(sorted(r["prompt"] for r in rows))}
    assert max(by_prompt.values()) == 3
    assert len(set(table.column("pair_id").to_pylist())) == len(rows)
    assert set(table.column("source").to_pylist()) <= {"alpaca_eval", "arena-hard-v0.1"}
