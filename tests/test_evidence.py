"""Bootstrap intervals, paired differences and cue baselines (gram_core.evidence, gram_core.cues)."""

import numpy as np
import pyarrow as pa

from gram_core.cues import cue_credit, strongest_cue
from gram_core.evidence import accuracy_interval, evidence, evidence_lines, paired_difference


def test_cues_prefer_their_feature_and_ties_count_half():
    assert cue_credit("prefer longer", "a long answer", "short") == 1.0
    assert cue_credit("prefer shorter", "a long answer", "short") == 0.0
    assert cue_credit("prefer more capitals", "abc", "xyz") == 0.5
    assert cue_credit("prefer deeper nesting", '{"a": [1]}', '{"a": 1}') == 1.0
    assert cue_credit("prefer the prefix", "abc", "abc def") == 1.0
    assert strongest_cue(["LOUD", "LOUDER"], ["quiet", "calm"])[1] == 1.0


def test_interval_covers_the_mean_and_shrinks_with_more_pairs():
    rng = np.random.default_rng(0)
    small, large = rng.random(50) < 0.7, rng.random(2000) < 0.7
    a, b = accuracy_interval(small), accuracy_interval(large)
    assert a["low"] <= a["value"] <= a["high"] and b["low"] <= b["value"] <= b["high"]
    assert (b["high"] - b["low"]) < (a["high"] - a["low"]) / 3


def test_clusters_widen_the_interval_of_near_copies():
    """Ten templates of 20 identical pairs each carry the evidence of ten pairs, not 200."""
    per_template = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], dtype=float)
    values = np.repeat(per_template, 20)
    clusters = np.repeat(np.arange(10), 20)
    naive, clustered = accuracy_interval(values), accuracy_interval(values, clusters)
    assert (clustered["high"] - clustered["low"]) > 2.5 * (naive["high"] - naive["low"])


def test_paired_difference_detects_a_real_gap_and_calls_noise_noise():
    rng = np.random.default_rng(1)
    base = rng.random(400) < 0.6
    better = base | (rng.random(400) < 0.3)  # the same pairs plus some more right
    gap = paired_difference(better, base)
    assert gap["value"] > 0 and gap["low"] > 0 and not gap["within_noise"]
    flip = base.copy()
    flip[:2] = ~flip[:2]
    assert paired_difference(flip, base)["within_noise"]


def test_evidence_table_has_judges_cues_and_differences():
    rows = [{"id": i, "prompt": f"q{i}", "chosen": "x" * (i % 3 + 1), "rejected": "yy", "subset": s}
            for i, s in enumerate(["a"] * 6 + ["if-json"] * 4)]
    def scores(correct):
        return pa.table({"id": [str(i) for i in range(10)], "subset": [r["subset"] for r in rows],
                         "p_chosen_order1": [0.9 if c else 0.1 for c in correct],
                         "p_chosen_order2": [0.8 if c else 0.4 for c in correct],
                         "p_chosen": [0.85 if c else 0.25 for c in correct], "correct": correct})
    ev = evidence({"zero-shot": scores([False] * 10), "GRAM": scores([True] * 8 + [False] * 2)}, rows)
    names = [r["name"] for r in ev["rows"]]
    assert names[:2] == ["zero-shot", "GRAM"] and "prefer longer" in names
    gram = ev["rows"][1]
    assert gram["all"]["value"] == 0.8 and gram["in_distribution"]["value"] == 1.0
    assert gram["heldout"]["value"] == 0.5
    assert ev["differences"][0]["name"] == "GRAM - zero-shot" and not ev["differences"][0]["within_noise"]
    parts = {d.get("part"): d for d in ev["differences"]}  # the same difference on each part of the eval set
    assert parts["in_distribution"]["value"] == 1.0 and parts["heldout"]["value"] == 0.5
    text = "\n".join(evidence_lines(ev))
    assert "beyond noise" in text and "(cue)" in text and "[" in text
    assert "GRAM - zero-shot, in-distribution: +100.0" in text and "GRAM - zero-shot, held-out: +50.0" in text
