"""The quality study's readout: every arm's RewardBench(-lite) sections, position consistency and calibration
side by side, as a Markdown table and a PNG (pure rendering from scores tables; no Prefect, no MLflow).

Arms (same base model, same labelled data, same stage-2 steps): the base model zero-shot; a Bradley-Terry
reward model; the generative judge without stage 1; GRAM (stage 1 + stage 2) with ε = 0.1; GRAM with ε = 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gram_core.calibration import expected_calibration_error
from gram_core.evidence import LEVEL, RESAMPLES, cue_rows, fmt_interval, interval
from gram_core.report import CREDIT, CUE_TIE_RULE, accuracy, credit, pct
from gram_core.rewardbench import (
    PROTOCOL_NOTE,
    SECTIONS,
    SUBSET_WEIGHTS,
    section_scores,
    weighted_section_scores,
)

ARMS: dict[str, str] = {
    "zero_shot": "base model, zero-shot judge",
    "bt": "Bradley-Terry reward model",
    "judge_no_stage1": "generative judge, no stage 1 (ε = 0.1)",
    "gram": "GRAM: stage 1 + stage 2 (ε = 0.1)",
    "gram_eps0": "GRAM: stage 1 + stage 2 (ε = 0)",
}
SCALAR_ARMS = ("bt",)
COMPARED_ARM = "gram"  # the paired differences are GRAM minus each other arm


def cue_tables(eval_rows: Any) -> dict[str, dict[str, list]]:
    """Scores tables of the reported cue baselines (prefer longer, shorter, more capitals) on the eval pairs:
    P(chosen) and ``credit`` = 1 when the cue picks the chosen answer, 0 when it picks the rejected one, 0.5 on a
    tie (a cue's tie counts half, as in the run summary: gram_core.report). A judge no better than its cue row has
    learned the shortcut."""
    table = eval_rows.to_pydict() if hasattr(eval_rows, "to_pydict") else eval_rows
    return {f"cue: {cue}": {"id": list(table["id"]), "subset": list(table["subset"]),
                            "p_chosen": [float(c) for c in credits], CREDIT: [float(c) for c in credits]}
            for cue, credits in cue_rows(table["chosen"], table["rejected"]).items()}


LENGTH_CUE = "cue: prefer longer"  # RewardBench's best-known shortcut; the study compares GRAM with it too
ORDER = ["stage1", *ARMS]  # the training table's rows
PLATEAU_EXIT = 0.6  # a pairwise loss below this (trailing mean) has left the ln 2 = 0.693 plateau
TRAILING = 10


def training_summary(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One training curve in four numbers: steps, mean loss over the first ``TRAILING`` steps and over the last
    10 % of steps, and the first step whose trailing ``TRAILING``-step mean loss is below ``PLATEAU_EXIT``
    (None: never; meaningful for the pairwise losses, which start near ln 2)."""
    rows = [r for r in history if "train/loss" in r]
    losses = np.array([float(r["train/loss"]) for r in rows])
    if not len(losses):
        return {"steps": 0, "first_loss": None, "final_loss": None, "exit_step": None}
    window = min(TRAILING, len(losses))  # a run shorter than the window: one mean over all of it
    trailing = np.convolve(losses, np.ones(window) / window, mode="valid")
    below = np.flatnonzero(trailing < PLATEAU_EXIT)
    return {"steps": len(losses), "first_loss": float(losses[:TRAILING].mean()),
            "final_loss": float(losses[-max(1, len(losses) // 10):].mean()),
            "last_loss": float(losses[-TRAILING:].mean()),
            "exit_step": int(rows[below[0] + window - 1].get("step", below[0] + window)) if below.size else None}


def training_lines(training: Mapping[str, Mapping[str, Any]], names: Mapping[str, str]) -> list[str]:
    """One line per trained model of a run summary: its steps, the mean loss of its last ``TRAILING`` steps and
    when its pairwise loss left the ln 2 plateau. ``training``: key -> ``training_summary``; ``names``: labels."""
    lines = []
    for key, t in training.items():
        if not t["steps"]:
            continue
        exit_step = "never" if t["exit_step"] is None else f"at step {t['exit_step']}"
        lines.append(f"{names.get(key, key)}: {t['steps']} optimizer steps, loss over the last {TRAILING} steps "
                     f"{t['last_loss']:.3f} (ln 2 = 0.693; left the plateau {exit_step})")
    return lines


def training_markdown(training: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each trained model's curve: did its pairwise loss leave the ln 2 plateau, and when."""
    if not training:
        return []
    lines = [f"Training curves (train loss; stage 1 is the language-model loss). A pairwise loss starts near "
             f"ln 2 = 0.693; \"left the plateau\" = the first step whose {TRAILING}-step trailing mean is below "
             f"{PLATEAU_EXIT}.", "", f"| model | steps | loss, first {TRAILING} steps | loss, last 10 % of steps | "
             "left the plateau at step |", "|---|---|---|---|---|"]
    for name, t in sorted(training.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)):
        first = "—" if t["first_loss"] is None else f"{t['first_loss']:.3f}"
        final = "—" if t["final_loss"] is None else f"{t['final_loss']:.3f}"
        exit_step = "n/a (LM loss)" if name == "stage1" else ("never" if t["exit_step"] is None else str(t["exit_step"]))
        label = "stage 1 (pre-training)" if name == "stage1" else ARMS.get(name, name)
        lines.append(f"| {label} | {t['steps']} | {first} | {final} | {exit_step} |")
    return lines


def _by_id(scores: Any) -> dict[str, tuple[str, float]]:
    """id -> (subset, credit), with the reports' one rule (gram_core.report: a model's tie counts as wrong)."""
    table = scores.to_pydict() if hasattr(scores, "to_pydict") else scores
    return {str(i): (str(s), float(c)) for i, s, c in zip(table["id"], table["subset"], credit(scores), strict=True)}


def paired_differences(a: Any, b: Any, seed: int = 0, level: float = LEVEL,
                       resamples: int = RESAMPLES) -> dict[str, dict[str, Any]]:
    """Score of ``a`` minus score of ``b`` on the same pairs (matched by id), per section, overall (mean of the
    sections) and over all pairs, with a paired bootstrap interval: each resample draws pairs with replacement
    inside every subset (the subset sizes stay fixed, as the section weights assume) and scores both arms on
    the same draw. ``within_noise`` when the interval contains 0."""
    rows_a, rows_b = _by_id(a), _by_id(b)
    if set(rows_a) != set(rows_b):
        raise ValueError(f"paired differences need the same pairs: {len(set(rows_a) ^ set(rows_b))} ids differ")
    subsets: dict[str, list[tuple[float, float]]] = {}
    for key, (subset, correct) in rows_a.items():
        subsets.setdefault(subset, []).append((correct, rows_b[key][1]))
    rng = np.random.default_rng(seed)
    boot = {}  # subset -> (point a, point b, resampled a [R], resampled b [R])
    for subset, flags in subsets.items():
        both = np.array(flags, dtype=float)
        draws = rng.integers(0, len(both), size=(resamples, len(both)))
        boot[subset] = (both[:, 0].mean(), both[:, 1].mean(), both[draws, 0].mean(axis=1), both[draws, 1].mean(axis=1))
    sizes = {s: len(f) for s, f in subsets.items()}
    total = sum(sizes.values())

    def scored(pick: int) -> tuple[dict[str, float], dict[str, np.ndarray], float, np.ndarray]:
        points = weighted_section_scores({s: v[pick] for s, v in boot.items() if s in SUBSET_WEIGHTS})
        spread = weighted_section_scores({s: v[pick + 2] for s, v in boot.items() if s in SUBSET_WEIGHTS})
        plain = sum(v[pick] * sizes[s] for s, v in boot.items()) / total
        plain_spread = sum(v[pick + 2] * sizes[s] for s, v in boot.items()) / total
        return points, spread, plain, plain_spread

    pa, sa, plain_a, plain_sa = scored(0)
    pb, sb, plain_b, plain_sb = scored(1)
    out = {section: interval(pa[section] - pb[section], sa[section] - sb[section], level) for section in pa}
    if pa:
        out["overall"] = interval(np.mean(list(pa.values())) - np.mean(list(pb.values())),
                                  np.mean(list(sa.values()), axis=0) - np.mean(list(sb.values()), axis=0), level)
    out["all pairs"] = interval(plain_a - plain_b, plain_sa - plain_sb, level)
    return out


def study_differences(scores: Mapping[str, Any], seed: int = 0,
                      cues: Mapping[str, Any] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """{"gram - <arm>": paired_differences(...)} for every other arm present, then GRAM minus the
    ``LENGTH_CUE`` row when ``cues`` (``cue_tables``) are given: the shortcut a judge must beat."""
    if COMPARED_ARM not in scores:
        return {}
    others = {arm: table for arm, table in scores.items() if arm != COMPARED_ARM}
    if cues and LENGTH_CUE in cues:
        others[LENGTH_CUE] = cues[LENGTH_CUE]
    return {f"{COMPARED_ARM} - {arm}": paired_differences(scores[COMPARED_ARM], table, seed)
            for arm, table in others.items()}


def differences_markdown(differences: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """The paired differences as a table (points, 95 % interval) with a within-noise verdict per cell."""
    if not differences:
        return []
    columns = list(dict.fromkeys(c for d in differences.values() for c in d))
    lines = [f"Paired differences in points, GRAM minus each arm on the same pairs, with {LEVEL:.0%} bootstrap "
             f"intervals ({RESAMPLES} resamples of the pairs inside each subset; overall = mean of the sections). "
             "**bold** = beyond noise (the interval excludes 0); plain = within noise.", "",
             "| difference | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, diff in differences.items():
        first, _, second = name.partition(" - ")
        label = f"{ARMS.get(first, first).split(':')[0]} − {ARMS.get(second, second)}"
        cells = []
        for column in columns:
            d = diff.get(column)
            text = "—" if d is None else fmt_interval(d, signed=True)
            cells.append(text if d is None or d["within_noise"] else f"**{text}**")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def arm_metrics(scores: Any, scalar: bool = False) -> dict[str, Any]:
    """Sections, overall, per-subset accuracy, position consistency (None for a scalar model) and ECE."""
    result = section_scores(scores)
    p = scores["p_chosen"].to_pylist() if hasattr(scores, "column_names") else list(scores["p_chosen"])
    return {"sections": dict(result.sections), "overall": result.overall, "accuracy": accuracy(scores),
            "subsets": {k: v[0] for k, v in result.subsets.items()}, "rows": result.rows,
            "position_consistency": None if scalar else result.position_consistency,
            "ece": expected_calibration_error(p)}


def _pct(value: float | None) -> str:
    return pct(value, missing="n/a")


def study_markdown(metrics: Mapping[str, Mapping[str, Any]], *, eval_name: str, command: str | None = None,
                   wall_minutes: float | None = None, notes: list[str] | None = None,
                   differences: Mapping[str, Any] | None = None,
                   training: Mapping[str, Mapping[str, Any]] | None = None,
                   cues: Mapping[str, Mapping[str, Any]] | None = None) -> str:
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
    cues = dict(cues or {})
    for cue, m in cues.items():  # surface-feature baselines: a judge at its cue's level learned the shortcut
        cells = [f"*{cue}*", *(_pct(m["sections"].get(s)) for s in sections), _pct(m["overall"]),
                 _pct(m["accuracy"]), "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    columns = {**{a: metrics[a] for a in arms}, **cues}
    subsets = list(dict.fromkeys(s for m in columns.values() for s in m["subsets"]))
    lines += ["", "| subset | " + " | ".join(ARMS.get(a, a) for a in columns) + " |",
              "|" + "---|" * (len(columns) + 1)]
    for subset in subsets:
        lines.append(f"| {subset} | " + " | ".join(_pct(m["subsets"].get(subset)) for m in columns.values()) + " |")
    rows = {metrics[a]["rows"] for a in arms}
    out = [f"Eval set: {eval_name} ({', '.join(str(r) for r in sorted(rows))} pairs). {PROTOCOL_NOTE} "
           "Accuracies in %; overall = mean of the sections present, all pairs = plain pairwise accuracy. "
           "The Bradley-Terry model is scored in one order (a scalar reward has no slots). "
           "ECE: expected calibration error of P(chosen ≻ rejected), 10 confidence bins."
           + (f" *Cue* rows pick an answer by one surface feature alone ({CUE_TIE_RULE})." if cues else ""),
           "", *lines]
    if differences:
        out += ["", *differences_markdown(differences)]
    if training:
        out += ["", *training_markdown(training)]
    if command:
        out = [f"Command: `{command}`" + (f" — wall time {wall_minutes:.1f} min" if wall_minutes else ""), "", *out]
    if notes:
        out += ["", *notes]
    return "\n".join(out) + "\n"


def study_readout(tables: Mapping[str, Any], eval_rows: Any, histories: Mapping[str, Sequence[Mapping[str, Any]]],
                  eval_name: str) -> dict[str, Any]:
    """Everything a study report shows, from the arms' scores tables (arm -> table), the scored eval pairs and
    the training histories (arm or "stage1" -> rows): metrics per arm, cue rows, GRAM's paired differences,
    the training curves, and the Markdown (``markdown``) that renders them."""
    metrics = {arm: arm_metrics(table, scalar=arm in SCALAR_ARMS) for arm, table in tables.items()}
    cue_scores = cue_tables(eval_rows)
    cues = {cue: arm_metrics(table, scalar=True) for cue, table in cue_scores.items()}
    differences = study_differences(tables, cues=cue_scores)
    training = {name: training_summary(history) for name, history in histories.items()}
    return {"arms": metrics, "cues": cues, "differences": differences, "training": training,
            "markdown": study_markdown(metrics, eval_name=eval_name, differences=differences, training=training,
                                       cues=cues)}


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
