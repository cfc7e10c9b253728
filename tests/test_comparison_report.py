"""The evaluation report: any number of models side by side, a scalar reward model without position consistency."""

from __future__ import annotations

import pyarrow as pa
import pytest

from gram_core.comparison_report import (
    NOT_APPLICABLE,
    ORDERS,
    comparison_markdown,
    comparison_rows,
    eval_metrics,
    write_chart,
)


def scores(rows):
    """rows: (subset, p_order1, p_order2) -> a scores-contract table."""
    p = [(a + b) / 2 for _s, a, b in rows]
    return pa.table({"id": [str(i) for i in range(len(rows))], "subset": [s for s, _a, _b in rows],
                     "p_chosen_order1": [float(a) for _s, a, _b in rows],
                     "p_chosen_order2": [float(b) for _s, _a, b in rows], "p_chosen": p,
                     "correct": [x > 0.5 for x in p]})


ZERO_SHOT = scores([("llmbar-natural", 0.9, 0.0), ("llmbar-natural", 0.2, 0.3), ("my-task", 0.6, 0.7)] * 2)
BT = scores([("llmbar-natural", 0.7, 0.7), ("llmbar-natural", 0.4, 0.4), ("my-task", 0.8, 0.8)] * 2)
GRAM = scores([("llmbar-natural", 0.9, 0.8), ("llmbar-natural", 0.6, 0.7), ("my-task", 0.3, 0.4)] * 2)


def test_scalar_metrics_say_one_order_and_have_no_position_consistency():
    judge, scalar = eval_metrics(ZERO_SHOT), eval_metrics(BT, scalar=True)
    assert judge[ORDERS] == 2.0 and judge["rewardbench/position_consistency"] == pytest.approx(2 / 3)
    assert scalar[ORDERS] == 1.0 and "rewardbench/position_consistency" not in scalar
    assert scalar["eval/accuracy"] == pytest.approx(2 / 3)  # same accuracy as read without the flag
    assert eval_metrics(BT)["rewardbench/position_consistency"] == 1.0  # what the flag keeps out of the table


def test_rows_line_up_every_column_in_order():
    columns = {"zero-shot": eval_metrics(ZERO_SHOT), "BT": eval_metrics(BT, scalar=True),
               "GRAM": eval_metrics(GRAM)}
    rows = {r["name"]: r["values"] for r in comparison_rows(columns)}
    assert list(rows["accuracy (all pairs)"]) == ["zero-shot", "BT", "GRAM"]
    assert rows["accuracy (all pairs)"] == pytest.approx({"zero-shot": 1 / 3, "BT": 2 / 3, "GRAM": 2 / 3})
    assert rows["position consistency"] == {"zero-shot": pytest.approx(2 / 3), "BT": NOT_APPLICABLE, "GRAM": 1.0}
    assert rows["my-task"] == pytest.approx({"zero-shot": 1.0, "BT": 1.0, "GRAM": 0.0})


def test_report_shows_three_columns_and_the_scalar_protocol(tmp_path):
    text = comparison_markdown({"zero-shot": ZERO_SHOT, "BT": BT, "GRAM": GRAM}, scalar={"BT"}, eval_name="toy")
    assert "| | zero-shot | BT | GRAM |\n|---|---|---|---|" in text
    assert "| **accuracy (all pairs)** | 33.3 | 66.7 | 66.7 |" in text
    assert "| **position consistency** | 66.7 | n/a (scalar) | 100.0 |" in text
    assert "zero-shot, GRAM: judged in both slot orders" in text and "BT: a scalar reward model" in text
    detail = text[text.index("## BT: detail"):text.index("## GRAM: detail")]
    assert "scored once per pair" in detail and "Scored in both orders" not in detail
    path = write_chart(tmp_path / "chart.png", {"zero-shot": eval_metrics(ZERO_SHOT), "BT": eval_metrics(BT, True),
                                                "GRAM": eval_metrics(GRAM)})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_names_the_rows_dropped_before_scoring():
    drops = {"rows": 2, "rules": {"prompt.blank": 1, "rejected.equals_chosen": 1},
             "first": [{"source": "/d/bench.jsonl", "row": 3, "id": 3, "rules": ["prompt.blank"]},
                       {"source": "/d/bench.jsonl", "row": 9, "id": 9, "rules": ["rejected.equals_chosen"]}]}
    text = comparison_markdown({"GRAM": GRAM}, eval_name="bench.jsonl", dropped=drops, rows_read=8)
    assert ("Eval set: bench.jsonl, 6 pairs. Before scoring, 2 of 8 rows dropped as invalid (prompt.blank 1, "
            "rejected.equals_chosen 1): bench.jsonl row 3 (id 3); bench.jsonl row 9 (id 9). Accuracies") in text
    assert "dropped" not in comparison_markdown({"GRAM": GRAM})
