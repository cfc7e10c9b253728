"""The evaluation report: base model zero-shot vs trained judge, as Markdown and a PNG bar chart.

Pure rendering from scores tables (no Prefect, no MLflow): ``eval_metrics`` turns a scores table into flat
metrics (``rewardbench/...`` from gram_core.rewardbench plus plain ``eval/accuracy``), ``comparison_rows``
lines the two models up, ``report_markdown`` and ``write_chart`` render them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gram_core.rewardbench import SECTIONS, section_scores, to_metrics
from gram_core.rewardbench import report_markdown as rewardbench_markdown

ACCURACY = "eval/accuracy"
IN_DISTRIBUTION = "eval/in_distribution"
HELDOUT = "eval/heldout"
CONSISTENCY = "rewardbench/position_consistency"
STARTER_PREFIX = "eval/starter/"


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values)


def eval_metrics(scores: Any) -> dict[str, float]:
    """RewardBench metrics of a scores table, the plain pairwise accuracy over all rows and, for the
    starter set's own subsets, accuracy per starter section and on held-out vs in-distribution subsets."""
    from gram_core.starter import HELDOUT_SUBSETS, STARTER_SECTIONS

    metrics = to_metrics(section_scores(scores))
    correct = scores["correct"].to_pylist()
    subsets = scores["subset"].to_pylist()
    metrics[ACCURACY] = _mean(correct)
    sections: dict[str, list[bool]] = {}
    for subset, ok in zip(subsets, correct, strict=True):
        if subset in STARTER_SECTIONS:
            sections.setdefault(STARTER_SECTIONS[subset], []).append(ok)
    for section, values in sections.items():
        metrics[STARTER_PREFIX + section.lower().replace(" ", "_")] = _mean(values)
    held = [ok for subset, ok in zip(subsets, correct, strict=True) if subset in HELDOUT_SUBSETS]
    if held and len(held) < len(correct):
        metrics[HELDOUT] = _mean(held)
        metrics[IN_DISTRIBUTION] = _mean([ok for s, ok in zip(subsets, correct, strict=True)
                                          if s not in HELDOUT_SUBSETS])
    return metrics


def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def comparison_rows(trained: Mapping[str, float], base: Mapping[str, float] | None) -> list[dict[str, Any]]:
    """One row per reported quantity: name, kind (overall/section/subset), base and trained values."""
    base = base or {}
    from gram_core.starter import HELDOUT_SUBSETS

    rows = [{"name": "accuracy (all pairs)", "kind": "overall", "key": ACCURACY}]
    if IN_DISTRIBUTION in trained:
        rows += [{"name": "accuracy, in-distribution subsets", "kind": "overall", "key": IN_DISTRIBUTION},
                 {"name": "accuracy, held-out subsets", "kind": "overall", "key": HELDOUT}]
    if "rewardbench/overall" in trained:
        rows.append({"name": "RewardBench overall", "kind": "overall", "key": "rewardbench/overall"})
    rows.append({"name": "position consistency", "kind": "overall", "key": CONSISTENCY})
    for section in SECTIONS:
        key = "rewardbench/" + section.lower().replace(" ", "_")
        if key in trained:
            rows.append({"name": section, "kind": "section", "key": key})
        starter_key = STARTER_PREFIX + section.lower().replace(" ", "_")
        if starter_key in trained:
            rows.append({"name": f"{section} (starter subsets)", "kind": "section", "key": starter_key})
    skip = {ACCURACY, CONSISTENCY, "rewardbench/overall", "rewardbench/ties", "rewardbench/rows"}
    skip |= {r["key"] for r in rows}
    for key in trained:
        if key.startswith("rewardbench/") and key not in skip:
            name = key.removeprefix("rewardbench/").removeprefix("unknown/")
            held = " (held-out)" if name in HELDOUT_SUBSETS else ""
            rows.append({"name": name + held, "kind": "subset", "key": key})
    for row in rows:
        row["trained"] = trained.get(row["key"])
        row["base"] = base.get(row["key"])
    return rows


def report_markdown(trained_scores: Any, base_scores: Any | None, *, title: str = "GRAM judge evaluation",
                    eval_name: str = "eval set", model_name: str = "trained judge",
                    base_name: str = "base model (zero-shot)") -> str:
    """Comparison table (base vs trained), then the full RewardBench-style readout of each."""
    trained = eval_metrics(trained_scores)
    base = eval_metrics(base_scores) if base_scores is not None else None
    lines = [f"# {title}", "", f"Eval set: {eval_name}, {trained_scores.num_rows} pairs. Accuracies in %, both "
             "slot orders scored; a tie counts as wrong.", ""]
    header = f"| | {base_name} | {model_name} |" if base else f"| | {model_name} |"
    lines += [header, "|---|---|---|" if base else "|---|---|"]
    for row in comparison_rows(trained, base):
        name = f"**{row['name']}**" if row["kind"] == "overall" else (
            row["name"] if row["kind"] == "section" else f"&nbsp;&nbsp;{row['name']}")
        cells = [_fmt(row["base"])] if base else []
        lines.append(f"| {name} | " + " | ".join([*cells, _fmt(row["trained"])]) + " |")
    lines += ["", rewardbench_markdown(section_scores(trained_scores), title=f"{model_name}: detail")]
    if base_scores is not None:
        lines += [rewardbench_markdown(section_scores(base_scores), title=f"{base_name}: detail")]
    lines.append("![accuracy per subset](chart.png)")
    return "\n".join(lines) + "\n"


def write_chart(path: str | Path, trained: Mapping[str, float], base: Mapping[str, float] | None,
                title: str = "Pairwise accuracy: base zero-shot vs trained GRAM judge") -> Path:
    """Horizontal grouped bars per overall metric, section and subset (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in comparison_rows(trained, base) if r["trained"] is not None]
    labels = [r["name"] for r in rows][::-1]
    y = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5), dpi=100)
    height = 0.4 if base else 0.6
    if base:
        ax.barh([v + height / 2 for v in y], [100 * (r["base"] or 0.0) for r in rows][::-1], height,
                label="base (zero-shot)", color="#9e9e9e")
    ax.barh([v - (height / 2 if base else 0) for v in y], [100 * r["trained"] for r in rows][::-1], height,
            label="trained judge", color="#1f77b4")
    ax.axvline(50, color="#d62728", linestyle="--", linewidth=1, label="chance")
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 100)
    ax.set_xlabel("%")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    # Fixed metadata keeps the PNG bytes identical for identical numbers (content-addressed store).
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
