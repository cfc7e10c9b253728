"""Error bars for pairwise accuracies: cluster bootstrap intervals, paired differences, cue baselines.

Pairs made from one template are not independent evidence (near-copies share their answer), so the starter
set resamples templates, not pairs: ``clusters`` gives each pair its template's key. Two judges scored on the
same pairs are compared by a paired bootstrap of the difference (the same resampled clusters for both), which
is much tighter than two separate intervals. A difference whose interval contains 0 is within noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gram_core.cues import REPORTED_CUES, cue_credits
from gram_core.report import CUE_TIE_RULE, credit, mean_credit, orders_agree, pct

LEVEL = 0.95
RESAMPLES = 2000


def _cluster_index(clusters: Sequence[Any] | None, n: int) -> tuple[np.ndarray, int]:
    """(cluster number per pair, number of clusters); no clusters: every pair is its own."""
    if clusters is None:
        return np.arange(n), n
    keys = {key: i for i, key in enumerate(dict.fromkeys(clusters))}
    return np.array([keys[c] for c in clusters]), len(keys)


def _resampled_means(values: np.ndarray, clusters: Sequence[Any] | None, seed: int,
                     resamples: int = RESAMPLES) -> np.ndarray:
    """Means of ``values`` (pairs x k) over clusters drawn with replacement, [resamples, k]."""
    index, count = _cluster_index(clusters, len(values))
    sums = np.zeros((count, values.shape[1]))
    np.add.at(sums, index, values)
    sizes = np.bincount(index, minlength=count).astype(float)
    draws = np.random.default_rng(seed).integers(0, count, size=(resamples, count))
    weights = np.zeros((resamples, count))
    for row in range(resamples):  # how often each cluster was drawn
        weights[row] = np.bincount(draws[row], minlength=count)
    return (weights @ sums) / (weights @ sizes)[:, None]


def interval(point: float, spread: np.ndarray, level: float = LEVEL) -> dict[str, Any]:
    """{"value", "low", "high", "within_noise"}: ``point`` with the percentile interval of its bootstrap
    ``spread``; ``within_noise`` when the interval contains 0 (meaningful for differences)."""
    tail = (1 - level) / 2 * 100
    low, high = float(np.percentile(spread, tail)), float(np.percentile(spread, 100 - tail))
    return {"value": float(point), "low": low, "high": high, "within_noise": bool(low <= 0 <= high)}


def accuracy_interval(correct: Sequence[float], clusters: Sequence[Any] | None = None, seed: int = 0,
                      level: float = LEVEL) -> dict[str, float]:
    """{"value", "low", "high"}: the accuracy of per-pair credits (gram_core.report) and its percentile bootstrap
    interval (over clusters if given)."""
    values = np.asarray(correct, dtype=float)
    if len(values) == 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    means = _resampled_means(values[:, None], clusters, seed)[:, 0]
    return {k: v for k, v in interval(mean_credit(values), means, level).items() if k != "within_noise"}


def paired_difference(a: Sequence[float], b: Sequence[float], clusters: Sequence[Any] | None = None,
                      seed: int = 0, level: float = LEVEL) -> dict[str, Any]:
    """mean(a) - mean(b) on the same pairs with its paired bootstrap interval; ``within_noise`` when the
    interval contains 0."""
    values = np.stack([np.asarray(a, dtype=float), np.asarray(b, dtype=float)], axis=1)
    if len(values) == 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "within_noise": True}
    means = _resampled_means(values, clusters, seed)
    return interval(values[:, 0].mean() - values[:, 1].mean(), means[:, 0] - means[:, 1], level)


def cue_rows(chosen: Sequence[str], rejected: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-pair credit of each reported cue baseline (prefer longer, shorter, more capitals): 1, 0, or 0.5 on a tie
    (gram_core.report.CUE_TIE_RULE)."""
    return {cue: cue_credits(cue, chosen, rejected) for cue in REPORTED_CUES}


def fmt_interval(interval: Mapping[str, float], signed: bool = False) -> str:
    """'66.2 [58.1, 73.4]' in percent; ``signed`` puts a + on positive values (for differences)."""
    value, low, high = (pct(interval[k], signed=signed) for k in ("value", "low", "high"))
    return f"{value} [{low}, {high}]"


def starter_clusters(eval_rows: Sequence[Mapping[str, Any]]) -> list[str] | None:
    """Template keys ("subset:template") of starter eval rows, or None when the rows are not the starter's.

    A pair without a template of its own (a free-form prompt drawn from topic x question x instruction) is
    its own cluster."""
    from gram_core.starter import starter_checks, starter_eval

    shipped = {int(r["id"]): r["prompt"] for r in starter_eval().select(["id", "prompt"]).to_pylist()}
    if not eval_rows or any(shipped.get(int(r["id"])) != r["prompt"] for r in eval_rows):
        return None
    checks = starter_checks()
    keys = []
    for r in eval_rows:
        template = checks[("eval", str(int(r["id"])))].get("template")
        keys.append(f"{r['subset']}:{template}" if template else f"{r['subset']}:#{int(r['id'])}")
    return keys


def evidence(columns: Mapping[str, Any], eval_rows: Sequence[Mapping[str, Any]], scalar: Sequence[str] = (),
             seed: int = 0) -> dict[str, Any]:
    """Accuracy intervals of each model and each cue baseline (overall, in-distribution, held-out), position
    consistency, and paired differences of the last model (the one under test) against every other.

    ``columns``: name -> scores table (id, subset, p_chosen, p_chosen_order1/2) in the order of ``eval_rows``'s
    ids, counted by gram_core.report (a model's tie counts as wrong, a cue's half); ``eval_rows``: the eval set's rows (id, prompt, chosen, rejected, subset)."""
    from gram_core.starter import HELDOUT_SUBSETS

    order = {str(r["id"]): i for i, r in enumerate(eval_rows)}
    subsets = [r["subset"] for r in eval_rows]
    clusters = starter_clusters(eval_rows)
    held = np.array([s in HELDOUT_SUBSETS for s in subsets])
    credits: dict[str, np.ndarray] = {}
    consistency: dict[str, float | None] = {}
    for name, table in columns.items():
        rows = table.select([c for c in ("id", "p_chosen_order1", "p_chosen_order2")
                             if c in table.column_names]).to_pylist()
        values = np.zeros(len(eval_rows))
        agree = []
        for row, value in zip(rows, credit(table), strict=True):
            values[order[str(row["id"])]] = value
            if name not in scalar and "p_chosen_order1" in row:
                agree.append(bool(orders_agree(row["p_chosen_order1"], row["p_chosen_order2"])))
        credits[name] = values
        consistency[name] = float(np.mean(agree)) if agree else None
    cues = cue_rows([r["chosen"] for r in eval_rows], [r["rejected"] for r in eval_rows])
    credits.update(cues)

    def parts(values: np.ndarray) -> dict[str, Any]:
        out = {"all": accuracy_interval(values, clusters, seed)}
        if held.any() and not held.all():
            sub = lambda mask: [c for c, m in zip(clusters, mask, strict=True) if m] if clusters else None  # noqa: E731
            out["in_distribution"] = accuracy_interval(values[~held], sub(~held), seed)
            out["heldout"] = accuracy_interval(values[held], sub(held), seed)
        return out

    rows = [{"name": name, "kind": "cue" if name in cues else "model", **parts(values),
             "consistency": consistency.get(name)} for name, values in credits.items()]
    models = list(columns)
    differences = []
    split = held.any() and not held.all()
    if len(models) > 1:
        last = models[-1]
        for other in models[:-1]:
            differences.append({"name": f"{last} - {other}", **paired_difference(credits[last], credits[other],
                                                                                  clusters, seed)})
            for part, mask in (("in_distribution", ~held), ("heldout", held)) if split else ():
                sub = [c for c, m in zip(clusters, mask, strict=True) if m] if clusters else None
                differences.append({"name": f"{last} - {other}", "part": part,
                                    **paired_difference(credits[last][mask], credits[other][mask], sub, seed)})
    return {"rows": rows, "differences": differences, "clusters": len(set(clusters)) if clusters else len(eval_rows),
            "clustered_by": "template" if clusters else "pair", "level": LEVEL}


def evidence_lines(ev: Mapping[str, Any]) -> list[str]:
    """A Markdown table of ``evidence``: one row per judge and per cue, then the paired differences."""
    split = any("heldout" in r for r in ev["rows"])
    head = "| | accuracy | in-distribution | held-out | position consistency |" if split else \
        "| | accuracy | position consistency |"
    lines = [f"Accuracy in % with {ev['level']:.0%} bootstrap intervals over {ev['clusters']} "
             f"{ev['clustered_by']}s (resampled {RESAMPLES}x); cue rows are surface-feature baselines "
             f"({CUE_TIE_RULE}).", "", head, "|---|" + "---|" * (head.count("|") - 2)]
    for r in ev["rows"]:
        cons = pct(r["consistency"])
        cells = [fmt_interval(r["all"])]
        if split:
            cells += [fmt_interval(r["in_distribution"]), fmt_interval(r["heldout"])]
        name = f"*{r['name']}* (cue)" if r["kind"] == "cue" else f"**{r['name']}**"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cons} |")
    if ev["differences"]:
        lines += ["", "Paired differences (same pairs, same resampled clusters):", ""]
        for d in ev["differences"]:
            verdict = "within noise" if d["within_noise"] else "beyond noise"
            part = {"in_distribution": ", in-distribution", "heldout": ", held-out"}.get(d.get("part"), "")
            lines.append(f"* {d['name']}{part}: {fmt_interval(d, signed=True)} points — {verdict}")
    return lines
