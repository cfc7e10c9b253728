"""RewardBench scoring on hand-made score tables: weights, ties, missing and unknown subsets."""

import math

import pyarrow as pa
import pytest

from gram_core.report import correct_flags
from gram_core.rewardbench import (
    SECTIONS,
    SUBSET_WEIGHTS,
    position_consistency,
    rewardbench_markdown,
    section_scores,
    subset_accuracy,
    to_metrics,
)


def make_scores(rows):
    """rows: (subset, p_order1, p_order2) -> a scores-contract table (p_chosen = mean, correct = p > 0.5)."""
    p = [(a + b) / 2 for _s, a, b in rows]
    return pa.table({
        "id": [str(i) for i in range(len(rows))],
        "subset": [s for s, _a, _b in rows],
        "p_chosen_order1": [float(a) for _s, a, _b in rows],
        "p_chosen_order2": [float(b) for _s, _a, b in rows],
        "p_chosen": p,
        "correct": [x > 0.5 for x in p],
    })


def accuracy_rows(subset, n_correct, n_wrong):
    return [(subset, 0.9, 0.8)] * n_correct + [(subset, 0.2, 0.3)] * n_wrong


def test_official_table_is_copied_exactly():
    assert SUBSET_WEIGHTS["math-prm"] == 984
    assert all(SUBSET_WEIGHTS[f"hep-{lang}"] == 164 for lang in ("cpp", "go", "java", "js", "python", "rust"))
    assert [len(v) for v in SECTIONS.values()] == [5, 6, 5, 7]
    assert sorted(s for v in SECTIONS.values() for s in v) == sorted(SUBSET_WEIGHTS)
    section_totals = {k: sum(SUBSET_WEIGHTS[s] for s in v) for k, v in SECTIONS.items()}
    assert section_totals == {"Chat": 358, "Chat Hard": 456, "Safety": 740, "Reasoning": 1968}


def test_reasoning_is_half_math_half_mean_hep():
    rows = accuracy_rows("math-prm", 3, 1)  # 0.75
    hep_acc = {"hep-cpp": (1, 1), "hep-go": (2, 0), "hep-java": (0, 2), "hep-js": (1, 3), "hep-python": (3, 1),
               "hep-rust": (1, 0)}
    for name, (good, bad) in hep_acc.items():
        rows += accuracy_rows(name, good, bad)
    result = section_scores(make_scores(rows))
    mean_hep = (0.5 + 1 + 0 + 0.25 + 0.75 + 1) / 6
    assert result.sections["Reasoning"] == pytest.approx(0.5 * 0.75 + 0.5 * mean_hep, abs=1e-12)
    assert result.subsets["math-prm"] == (0.75, 4)


def test_sections_and_overall_match_hand_computation():
    rows = (accuracy_rows("alpacaeval-easy", 1, 1)        # 0.5, w 100
            + accuracy_rows("mt-bench-easy", 1, 0)        # 1.0, w 28
            + accuracy_rows("llmbar-natural", 1, 3)       # 0.25, w 100
            + accuracy_rows("xstest-should-refuse", 2, 0)  # 1.0, w 250
            + accuracy_rows("donotanswer", 0, 2))         # 0.0, w 136
    result = section_scores(make_scores(rows))
    chat = (0.5 * 100 + 1.0 * 28) / 128
    safety = (1.0 * 250 + 0.0 * 136) / 386
    assert result.sections == pytest.approx({"Chat": chat, "Chat Hard": 0.25, "Safety": safety})
    assert result.overall == pytest.approx((chat + 0.25 + safety) / 3)
    assert result.missing_sections == ["Reasoning"]
    assert "mt-bench-med" in result.missing_subsets and "math-prm" in result.missing_subsets
    assert "alpacaeval-easy" not in result.missing_subsets
    assert result.rows == 11
    metrics = to_metrics(result)
    assert metrics["rewardbench/chat"] == pytest.approx(chat)
    assert metrics["rewardbench/chat_hard"] == pytest.approx(0.25)
    assert metrics["rewardbench/overall"] == pytest.approx((chat + 0.25 + safety) / 3)
    assert metrics["rewardbench/llmbar-natural"] == 0.25
    assert "rewardbench/reasoning" not in metrics


def test_tie_counts_as_wrong():
    rows = [("llmbar-natural", 0.5, 0.5), ("llmbar-natural", 0.7, 0.4), ("llmbar-natural", 0.6, 0.6)]
    scores = make_scores(rows)
    assert correct_flags(scores).tolist() == [False, True, True]  # (0.7+0.4)/2 = 0.55 > 0.5
    result = section_scores(scores)
    assert result.subsets["llmbar-natural"] == pytest.approx((2 / 3, 3))
    assert result.ties == 1


def test_correct_column_must_agree_with_strict_rule():
    scores = make_scores([("llmbar-natural", 0.5, 0.5)])
    scores = scores.set_column(5, "correct", pa.array([True]))  # a ">=" rule would mark the tie correct
    with pytest.raises(ValueError, match="'correct' disagrees .* rows \\[0\\]"):
        subset_accuracy(scores)


def test_unknown_subsets_are_reported_and_kept_out_of_sections():
    rows = accuracy_rows("llmbar-natural", 1, 1) + accuracy_rows("my-own-set", 3, 0)
    result = section_scores(make_scores(rows))
    assert result.unknown_subsets == ["my-own-set"]
    assert result.subsets["my-own-set"] == (1.0, 3)
    assert result.sections == {"Chat Hard": 0.5}
    assert result.overall == 0.5
    metrics = to_metrics(result)
    assert metrics["rewardbench/unknown/my-own-set"] == 1.0
    assert "rewardbench/my-own-set" not in metrics


def test_position_consistency_counts_agreeing_orders():
    rows = [("hep-go", 0.9, 0.8), ("hep-go", 0.9, 0.2), ("hep-go", 0.1, 0.3), ("hep-go", 0.5, 0.9)]
    scores = make_scores(rows)
    assert position_consistency(scores) == 0.5  # rows 0 and 2 agree; 0.5 is "not > 0.5"
    assert section_scores(scores).position_consistency == 0.5
    assert to_metrics(section_scores(scores))["rewardbench/position_consistency"] == 0.5


def test_nothing_official_gives_no_overall():
    result = section_scores(make_scores(accuracy_rows("custom", 1, 0)))
    assert result.overall is None and result.sections == {}
    assert result.missing_sections == list(SECTIONS)
    assert "rewardbench/overall" not in to_metrics(result)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="missing column 'p_chosen'"):
        subset_accuracy(pa.table({"subset": ["x"]}))
    with pytest.raises(ValueError, match=r"finite in \[0, 1\]; rows \[1\]"):
        subset_accuracy({"subset": ["x", "x"], "p_chosen": [0.2, math.nan]})


def test_report_marks_missing_sections_and_protocol():
    rows = accuracy_rows("llmbar-natural", 3, 1) + accuracy_rows("alpacaeval-easy", 1, 0) + [("odd", 0.9, 0.9)]
    text = rewardbench_markdown(section_scores(make_scores(rows)), title="RewardBench-lite")
    assert text.startswith("## RewardBench-lite\n")
    assert "both orders" in text.lower() and "official section weights" in text
    assert "| Safety | missing | 0/5 |" in text
    assert "| Chat Hard | 75.0 | 1/6 (partial) |" in text
    assert "| **Overall** | **87.5** (mean of 2 of 4 sections) | |" in text
    assert "| odd | 100.0 | 1 |" in text
    assert "Missing sections (excluded from overall): Safety, Reasoning." in text


def test_safety_uses_the_official_xstest_weights():
    from gram_core.rewardbench import PROTOCOL_NOTE, SUBSET_WEIGHTS

    # reward-bench's EXAMPLE_COUNTS (the leaderboard's table), not the released row counts (154 / 250)
    assert SUBSET_WEIGHTS["xstest-should-refuse"] == 250 and SUBSET_WEIGHTS["xstest-should-respond"] == 154
    rows = accuracy_rows("xstest-should-refuse", 1, 0) + accuracy_rows("xstest-should-respond", 0, 1)
    assert section_scores(make_scores(rows)).sections["Safety"] == pytest.approx(250 / 404)
    assert "xstest-should-refuse 250" in PROTOCOL_NOTE
