"""The evaluation report: models side by side (zero-shot | BT | GRAM), as Markdown and a PNG bar chart.

Pure rendering from scores tables (no Prefect, no MLflow): ``eval_metrics`` turns a scores table into flat
metrics (``rewardbench/...`` from gram_core.rewardbench plus plain ``eval/accuracy``), ``comparison_rows``
lines up any number of models (columns, in order), ``comparison_markdown`` and ``write_chart`` render them.
A scalar reward model (Bradley-Terry) is scored once per pair: σ(r_chosen − r_rejected) has no slot order, so
its metrics say ``eval/orders_scored`` = 1, carry no position consistency, and the tables show "n/a (scalar)".
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from gram_core.artifact_files import CHART_FILE
from gram_core.evidence import evidence_lines
from gram_core.report import TIE_RULE, credit, mean_credit, pct
from gram_core.rewardbench import (
    SECTIONS,
    RewardBenchResult,
    rewardbench_markdown,
    section_scores,
    to_metrics,
)

ACCURACY = "eval/accuracy"
IN_DISTRIBUTION = "eval/in_distribution"
HELDOUT = "eval/heldout"
CONSISTENCY = "rewardbench/position_consistency"
STARTER_PREFIX = "eval/starter/"
ORDERS = "eval/orders_scored"  # 2: a judge read in both slot orders; 1: a scalar reward model
NOT_APPLICABLE = "n/a (scalar)"
# The pipeline's columns in display order, key (report meta, run summary) -> name; "trained" is the GRAM judge,
# whose metrics the promotion gate reads.
COLUMNS = {"base": "zero-shot", "bt": "BT", "trained": "GRAM"}
TRAINED = "trained"


def readout(scores: Any, scalar: bool = False) -> RewardBenchResult:
    """RewardBench readout of a scores table; a scalar model's per-order columns (both = p) are left out, so
    no position consistency is computed for it."""
    if scalar:
        scores = scores.drop_columns([c for c in ("p_chosen_order1", "p_chosen_order2") if c in scores.column_names])
    return section_scores(scores)


def eval_metrics(scores: Any, scalar: bool = False) -> dict[str, float]:
    """RewardBench metrics of a scores table, the plain pairwise accuracy over all rows and, for the
    starter set's own subsets, accuracy per starter section and on held-out vs in-distribution subsets.
    ``scalar``: the scores come from a scalar reward model (one order, no position consistency)."""
    from gram_core.starter import HELDOUT_SUBSETS, STARTER_SECTIONS

    metrics = to_metrics(readout(scores, scalar))
    metrics[ORDERS] = 1.0 if scalar else 2.0
    correct = credit(scores).tolist()  # gram_core.report: a tie counts as wrong
    subsets = scores["subset"].to_pylist()
    metrics[ACCURACY] = mean_credit(correct)
    sections: dict[str, list[float]] = {}
    for subset, ok in zip(subsets, correct, strict=True):
        if subset in STARTER_SECTIONS:
            sections.setdefault(STARTER_SECTIONS[subset], []).append(ok)
    for section, values in sections.items():
        metrics[STARTER_PREFIX + section.lower().replace(" ", "_")] = mean_credit(values)
    held = [ok for subset, ok in zip(subsets, correct, strict=True) if subset in HELDOUT_SUBSETS]
    if held and len(held) < len(correct):
        metrics[HELDOUT] = mean_credit(held)
        metrics[IN_DISTRIBUTION] = mean_credit([ok for s, ok in zip(subsets, correct, strict=True)
                                                if s not in HELDOUT_SUBSETS])
    return metrics


def _value(metrics: Mapping[str, float], key: str) -> float | str | None:
    if key == CONSISTENCY and metrics.get(ORDERS) == 1:
        return NOT_APPLICABLE
    return metrics.get(key)


def comparison_rows(columns: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """One row per reported quantity over every column's metrics: name, kind (overall/section/subset), key,
    and ``values`` {column: value}, in column order (None: not measured; "n/a (scalar)": position
    consistency of a scalar reward model)."""
    from gram_core.starter import HELDOUT_SUBSETS

    present: dict[str, None] = {}
    for metrics in columns.values():
        present.update(dict.fromkeys(metrics))
    rows = [{"name": "accuracy (all pairs)", "kind": "overall", "key": ACCURACY}]
    if IN_DISTRIBUTION in present:
        rows += [{"name": "accuracy, in-distribution subsets", "kind": "overall", "key": IN_DISTRIBUTION},
                 {"name": "accuracy, held-out subsets", "kind": "overall", "key": HELDOUT}]
    if "rewardbench/overall" in present:
        rows.append({"name": "RewardBench overall", "kind": "overall", "key": "rewardbench/overall"})
    rows.append({"name": "position consistency", "kind": "overall", "key": CONSISTENCY})
    for section in SECTIONS:
        key = "rewardbench/" + section.lower().replace(" ", "_")
        if key in present:
            rows.append({"name": section, "kind": "section", "key": key})
        starter_key = STARTER_PREFIX + section.lower().replace(" ", "_")
        if starter_key in present:
            rows.append({"name": f"{section} (starter subsets)", "kind": "section", "key": starter_key})
    skip = {ACCURACY, CONSISTENCY, "rewardbench/overall", "rewardbench/ties", "rewardbench/rows"}
    skip |= {r["key"] for r in rows}
    for key in present:
        if key.startswith("rewardbench/") and key not in skip:
            name = key.removeprefix("rewardbench/").removeprefix("unknown/")
            held = " (held-out)" if name in HELDOUT_SUBSETS else ""
            rows.append({"name": name + held, "kind": "subset", "key": key})
    for row in rows:
        row["values"] = {column: _value(metrics, row["key"]) for column, metrics in columns.items()}
    return rows


def protocol_note(names: Collection[str], scalar: Collection[str] = ()) -> str:
    """How each column was scored: judges in both slot orders, scalar reward models once per pair."""
    judges = [n for n in names if n not in scalar]
    parts = []
    if judges:
        parts.append(f"{', '.join(judges)}: judged in both slot orders, P(chosen) = mean of the two.")
    if scalar:
        parts.append(f"{', '.join(n for n in names if n in scalar)}: a scalar reward model, scored once per pair; "
                     "P(chosen) = σ(r_chosen − r_rejected) does not depend on the slot order, so one order is "
                     f"enough and position consistency does not apply ({NOT_APPLICABLE}).")
    return " ".join(parts)


def comparison_markdown(columns: Mapping[str, Any], *, scalar: Collection[str] = (),
                    title: str = "GRAM judge evaluation", eval_name: str = "eval set",
                    evidence: Mapping[str, Any] | None = None, dropped: Mapping[str, Any] | None = None,
                    rows_read: int | None = None, chart: str | None = CHART_FILE) -> str:
    """Comparison table of the models side by side, then the full RewardBench-style readout of each.

    ``columns``: model name -> scores table, in column order (e.g. zero-shot, BT, GRAM); the models named in
    ``scalar`` are scalar reward models (one order, see ``eval_metrics``). ``dropped``: the eval set's invalid rows
    left out before scoring (``gram_core.sources.dropped_summary``), of ``rows_read`` when known. ``chart``: the
    chart's file name beside the report (``write_chart``), None for a report without one."""
    from gram_core.sources import dropped_text

    metrics = {name: eval_metrics(table, name in scalar) for name, table in columns.items()}
    rows = next(iter(columns.values())).num_rows
    dropped_note = f"Before scoring, {dropped_text(dict(dropped), rows_read)}. " if dropped is not None else ""
    lines = [f"# {title}", "", f"Eval set: {eval_name}, {rows} pairs. {dropped_note}Accuracies in %; {TIE_RULE}. "
             + protocol_note(list(columns), scalar), "",
             *(evidence_lines(evidence) + [""] if evidence else []),
             "| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in comparison_rows(metrics):
        name = f"**{row['name']}**" if row["kind"] == "overall" else (
            row["name"] if row["kind"] == "section" else f"&nbsp;&nbsp;{row['name']}")
        lines.append(f"| {name} | " + " | ".join(pct(v) for v in row["values"].values()) + " |")
    lines.append("")
    for name, table in columns.items():
        is_scalar = name in scalar
        detail = readout(table, is_scalar)
        if is_scalar:
            lines.append(rewardbench_markdown(detail, title=f"{name}: detail", protocol=protocol_note([name], [name])))
        else:
            lines.append(rewardbench_markdown(detail, title=f"{name}: detail"))
    if chart:
        lines.append(f"![accuracy per subset]({chart})")
    return "\n".join(lines) + "\n"


# Bar colours by position: the last column (the model under test) blue, the first (zero-shot) grey.
_FIRST, _LAST, _MIDDLE = "#9e9e9e", "#1f77b4", ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")


def write_chart(path: str | Path, columns: Mapping[str, Mapping[str, float]], title: str | None = None) -> Path:
    """Horizontal grouped bars (one per column, in order) per overall metric, section and subset (matplotlib,
    Agg backend); a value that does not apply (n/a) draws no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    rows = [r for r in comparison_rows(columns)
            if any(isinstance(v, (int, float)) for v in r["values"].values())]
    colors = [_LAST] if len(names) == 1 else [_FIRST, *(_MIDDLE * len(names))[:len(names) - 2], _LAST]
    y = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) * max(1, len(names) / 2) + 1.5), dpi=100)
    height = 0.8 / len(names)
    for j, (name, color) in enumerate(zip(names, colors, strict=True)):
        offset = height * ((len(names) - 1) / 2 - j)  # the first column on top of each group
        values = [r["values"][name] for r in rows][::-1]
        ax.barh([v + offset for v in y], [100 * v if isinstance(v, (int, float)) else math.nan for v in values],
                height, label=name, color=color)
    ax.axvline(50, color="#d62728", linestyle="--", linewidth=1, label="chance")
    ax.set_yticks(y, [r["name"] for r in rows][::-1])
    ax.set_xlim(0, 100)
    ax.set_xlabel("%")
    ax.set_title(title or "Pairwise accuracy: " + " | ".join(names))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    # Fixed metadata keeps the PNG bytes identical for identical numbers (content-addressed store).
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
