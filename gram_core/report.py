"""How a scored pair is counted and printed: the one accuracy definition, the tie rule and the percent formatter.

Read by every report: the run summary and the eval report (``comparison_report``, ``evidence``), the RewardBench
readout (``rewardbench``), calibration and the quality study (``study_report``).

* A model's pair (a judge or a reward model) is correct when P(chosen ≻ rejected) > 0.5, strictly: an exact tie
  (P = 0.5) counts as wrong, RewardBench's rule. Its credit is 1 or 0.
* A cue baseline (``gram_core.cues``: a rule that looks at one surface feature) has no probability, only a pick;
  its credit is stored with it (the ``credit`` column): 1 when it picks the chosen answer, 0 when it picks the
  rejected one, 0.5 on a tie. A cue that sees no difference breaks the tie by a coin flip, and half credit is that
  flip's expected score, so a cue blind to a subset sits on the 50 % chance line instead of below it.
* Accuracy = mean credit over the rows counted (``accuracy``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

TIE_RULE = "a tie (P = 0.5) counts as wrong"
CUE_TIE_RULE = "a cue's tie counts half: a coin flip's expected score"
CREDIT = "credit"  # a cue table's per-pair credit (1, 0 or 0.5); model scores tables have none


def column(scores: Any, name: str, required: bool = True) -> np.ndarray | None:
    """One column of a pyarrow table or a mapping of columns as a numpy array (None: absent, not required)."""
    if isinstance(scores, pa.Table):
        present = name in scores.column_names
        values = scores.column(name).to_pylist() if present else None
    elif isinstance(scores, Mapping):
        present = name in scores
        values = list(scores[name]) if present else None
    else:
        raise TypeError(f"scores must be a pyarrow.Table or a mapping of columns, got {type(scores).__name__}")
    if not present:
        if required:
            have = scores.column_names if isinstance(scores, pa.Table) else list(scores)
            raise ValueError(f"scores table: missing column {name!r} (scores contract); columns are {have}")
        return None
    if any(v is None for v in values):
        rows = [i for i, v in enumerate(values) if v is None][:10]
        raise ValueError(f"scores table: column {name!r} has nulls at rows {rows}")
    return np.asarray(values, dtype=object if name in ("id", "subset") else float)


def is_correct(p_chosen: Any) -> np.ndarray:
    """The tie rule, in one place: P(chosen) > 0.5, strictly (a tie counts as wrong)."""
    return np.asarray(p_chosen, dtype=float) > 0.5


def orders_agree(p_order1: Any, p_order2: Any) -> np.ndarray:
    """Position consistency per pair: both slot orders pick the same side under the one tie rule."""
    return is_correct(p_order1) == is_correct(p_order2)


def correct_flags(scores: Any) -> np.ndarray:
    """Per-row correct flags of a scores table (``is_correct`` of p_chosen); checks a stored ``correct`` column
    agrees."""
    p = column(scores, "p_chosen")
    bad = np.flatnonzero(~np.isfinite(p) | (p < 0) | (p > 1))
    if bad.size:
        raise ValueError(f"scores table: column 'p_chosen' must be finite in [0, 1]; rows {bad[:10].tolist()} "
                         f"have {p[bad[:10]].tolist()}")
    correct = is_correct(p)
    stored = column(scores, "correct", required=False)
    if stored is not None:
        differ = np.flatnonzero(stored.astype(bool) != correct)
        if differ.size:
            raise ValueError(f"scores table: column 'correct' disagrees with p_chosen > 0.5 (ties wrong) at rows "
                             f"{differ[:10].tolist()} (p_chosen {p[differ[:10]].tolist()})")
    return correct


def credit(scores: Any) -> np.ndarray:
    """Per-row credit: a cue table's ``credit`` column (1, 0, 0.5 on a tie), else a model's correct flags as 1/0."""
    stored = column(scores, CREDIT, required=False)
    if stored is None:
        return correct_flags(scores).astype(float)
    odd = np.flatnonzero(~np.isin(stored, (0.0, 0.5, 1.0)))
    if odd.size:
        raise ValueError(f"scores table: column {CREDIT!r} must be 0, 0.5 or 1; rows {odd[:10].tolist()} are not")
    return stored


def mean_credit(values: Any) -> float:
    """Accuracy of per-row credits (NaN for no rows)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()) if values.size else float("nan")


def accuracy(scores: Any) -> float:
    """The pairwise accuracy of a scores table (or cue table): mean ``credit`` over its rows."""
    return mean_credit(credit(scores))


def pct(value: float | str | None, missing: str = "—", signed: bool = False) -> str:
    """A fraction as a percentage with one decimal ('66.2'; ``signed``: '+3.1'); text passes through as it is
    (e.g. "n/a (scalar)"), ``missing`` stands for None and NaN."""
    if isinstance(value, str):
        return value
    if value is None or math.isnan(value):
        return missing
    return f"{round(100 * value, 1) + 0.0:{'+' if signed else ''}.1f}"  # + 0.0: no "-0.0"
