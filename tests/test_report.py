"""One accuracy, one tie rule, one formatter: the run summary, the eval report and the study give the same
scores the same number (gram_core.report)."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from flows.cli_text import format_summary
from gram_core.comparison_report import ACCURACY, comparison_markdown, comparison_rows, eval_metrics
from gram_core.evidence import evidence
from gram_core.report import accuracy, credit, pct
from gram_core.study_report import arm_metrics, cue_tables, study_markdown

# Ten pairs: four right, three wrong, and three exact ties (P(chosen) = 0.5: wrong for a model).
P1 = [0.9, 0.8, 0.7, 0.6, 0.2, 0.1, 0.3, 0.5, 0.6, 0.4]
P2 = [0.9, 0.8, 0.7, 0.6, 0.2, 0.1, 0.3, 0.5, 0.4, 0.6]
SUBSETS = ["alpacaeval-easy"] * 5 + ["llmbar-natural"] * 5
ROWS = [{"id": i, "prompt": f"question {i}", "subset": s, "chosen": "a longer answer" if i < 3 else "same",
         "rejected": "short" if i < 3 else "same"} for i, s in enumerate(SUBSETS)]


def scores_table() -> pa.Table:
    p = [(a + b) / 2 for a, b in zip(P1, P2, strict=True)]
    return pa.table({"id": [str(i) for i in range(10)], "subset": SUBSETS, "p_chosen_order1": P1,
                     "p_chosen_order2": P2, "p_chosen": p, "correct": [x > 0.5 for x in p]})


def test_the_summary_the_eval_report_and_the_study_count_the_same_scores_the_same():
    scores = scores_table()
    assert accuracy(scores) == 0.4  # ties wrong: 4 of 10, not 5.5 of 10

    summary_value = next(r for r in comparison_rows({"trained": eval_metrics(scores)}) if r["key"] == ACCURACY)
    summary_value = summary_value["values"]["trained"]
    ev = evidence({"GRAM": scores}, ROWS)
    report_value = next(r for r in ev["rows"] if r["name"] == "GRAM")["all"]["value"]
    study_value = arm_metrics(scores)["accuracy"]
    assert summary_value == report_value == study_value == 0.4

    # ... and print it the same way: the run summary, the eval report's table and the study's "all pairs".
    printed = format_summary({"columns": {"trained": "GRAM"}, "eval": [{"metric": "accuracy (all pairs)",
                                                                        "trained": summary_value}]})
    assert re.search(r"accuracy \(all pairs\)\s+40\.0\b", printed)
    assert "| **accuracy (all pairs)** | 40.0 |" in comparison_markdown({"GRAM": scores})
    study_row = next(line for line in study_markdown({"gram": arm_metrics(scores)}, eval_name="toy").splitlines()
                     if line.startswith("| GRAM"))
    assert "| 40.0 |" in study_row


def test_a_cue_tie_counts_half_in_the_eval_report_and_in_the_study():
    rows = ROWS
    ev = evidence({"GRAM": scores_table()}, rows)
    longer = next(r for r in ev["rows"] if r["name"] == "prefer longer")["all"]["value"]
    study = arm_metrics(cue_tables({k: [r[k] for r in rows] for k in rows[0]})["cue: prefer longer"], scalar=True)
    assert longer == study["accuracy"] == pytest.approx((3 + 0.5 * 7) / 10)  # 3 right, 7 ties at half credit
    assert study["subsets"]["llmbar-natural"] == 0.5  # a cue blind to a subset sits on the chance line


def test_credit_and_pct_rules():
    assert credit({"p_chosen": [0.5, 0.51, 0.49]}).tolist() == [0.0, 1.0, 0.0]
    assert credit({"p_chosen": [0.5], "credit": [0.5]}).tolist() == [0.5]
    with pytest.raises(ValueError, match="credit"):
        credit({"p_chosen": [0.5], "credit": [0.3]})
    assert [pct(0.6617), pct(None), pct(float("nan")), pct("n/a (scalar)"), pct(None, missing="n/a")] == \
        ["66.2", "—", "—", "n/a (scalar)", "n/a"]
    assert [pct(0.031, signed=True), pct(-0.0004, signed=True), pct(-0.05, signed=True)] == ["+3.1", "+0.0", "-5.0"]
