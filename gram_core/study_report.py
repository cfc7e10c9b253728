"""The quality study's readout: every arm's RewardBench(-lite) sections, position consistency and calibration
side by side, as a Markdown table and a PNG (pure rendering from scores tables; no Prefect, no MLflow).

Arms (same base model, same labelled data, same stage-2 steps): the base model zero-shot; a Bradley-Terry
reward model; the generative judge without stage 1; GRAM (stage 1 + stage 2) with ε = 0.1; GRAM with ε = 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gram_core.calibration import expected_calibration_error
from gram_core.rewardbench import PROTOCOL_NOTE, SECTIONS, section_scores

ARMS: dict[str, str] = {
    "zero_shot": "base model, zero-shot judge",
    "bt": "Bradley-Terry reward model",
    "judge_no_stage1": "generative judge, no stage 1 (ε = 0.1)",
    "gram": "GRAM: stage 1 + stage 2 (ε = 0.1)",
    "gram_eps0": "GRAM: stage 1 + stage 2 (ε = 0)",
}
SCALAR_ARMS = ("bt",)


def arm_metrics(scores: Any, scalar: bool = False) -> dict[str, Any]:
    """Sections, overall, per-subset accuracy, position consistency (None for a scalar model) and ECE."""
    result = section_scores(scores)
    p = scores["p_chosen"].to_pylist() if hasattr(scores, "column_names") else list(scores["p_chosen"])
    correct = [x > 0.5 for x in p]  # strict, as everywhere: a tie counts as wrong
    return {"sections": dict(result.sections), "overall": result.overall, "accuracy": sum(correct) / len(correct),
            "subsets": {k: v[0] for k, v in result.subsets.items()}, "rows": result.rows,
            "position_consistency": None if scalar else result.position_consistency,
            "ece": expected_calibration_error(p)}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def study_markdown(metrics: Mapping[str, Mapping[str, Any]], *, eval_name: str, command: str | None = None,
                   wall_minutes: float | None = None, notes: list[str] | None = None) -> str:
    """The study table: one row per arm (in ``ARMS`` order), sections then overall, consistency and ECE."""
    arms = [a for a in ARMS if a in metrics] + [a for a in metrics if a not in ARMS]
    sections = [s for s in SECTIONS if any(s in metrics[a]["sections"] for a in arms)]
    head = ["arm", *sections, "overall", "all pairs", "position consistency", "ECE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        m = metrics[arm]
        cells = [ARMS.get(arm, arm), *(_pct(m["sections"].get(s)) for s in sections), f"**{_pct(m['overall'])}**",
                 _pct(m["accuracy"]),
                 _pct(m["position_consistency"]) if m["position_consistency"] is not None else "n/a (scalar)",
                 f"{m['ece']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    subsets = list(dict.fromkeys(s for a in arms for s in metrics[a]["subsets"]))
    lines += ["", "| subset | " + " | ".join(ARMS.get(a, a) for a in arms) + " |", "|" + "---|" * (len(arms) + 1)]
    for subset in subsets:
        lines.append(f"| {subset} | " + " | ".join(_pct(metrics[a]["subsets"].get(subset)) for a in arms) + " |")
    rows = {metrics[a]["rows"] for a in arms}
    out = [f"Eval set: {eval_name} ({', '.join(str(r) for r in sorted(rows))} pairs). {PROTOCOL_NOTE} "
           "Accuracies in %; overall = mean of the sections present, all pairs = plain pairwise accuracy. "
           "The Bradley-Terry model is scored in one order (a scalar reward has no slots). "
           "ECE: expected calibration error of P(chosen ≻ rejected), 10 confidence bins.", "", *lines]
    if command:
        out = [f"Command: `{command}`" + (f" — wall time {wall_minutes:.1f} min" if wall_minutes else ""), "", *out]
    if notes:
        out += ["", *notes]
    return "\n".join(out) + "\n"


def write_study_chart(path: str | Path, metrics: Mapping[str, Mapping[str, Any]]) -> Path:
    """Grouped bars: per section and overall, one bar per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if a in metrics] + [a for a in metrics if a not in ARMS]
    groups = [s for s in SECTIONS if any(s in metrics[a]["sections"] for a in arms)] + ["all pairs"]
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(groups), 4.2))
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        values = [100 * (metrics[arm]["accuracy"] if g == "all pairs" else metrics[arm]["sections"].get(g) or 0.0)
                  for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=ARMS.get(arm, arm))
    ax.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks([x + width * (len(arms) - 1) / 2 for x in range(len(groups))], groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
