"""Calibration of pairwise preferences: expected calibration error (ECE) of P(chosen ≻ rejected).

A pair's prediction is the side with P > 0.5, its confidence max(P, 1 − P) ∈ [0.5, 1]. Pairs are put in
``bins`` equal-width confidence bins over [0.5, 1]; ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b|
(Guo et al. 2017, top-label form for two classes). A tie (P = 0.5) counts as wrong, as in every report (gram_core.report).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gram_core.report import is_correct


def calibration_bins(p_chosen: Sequence[float], bins: int = 10) -> list[dict[str, float]]:
    """Per non-empty bin: lower/upper confidence edge, pairs, mean confidence and accuracy."""
    p = np.asarray(p_chosen, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError("calibration_bins: expected a non-empty 1-D sequence of probabilities")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("calibration_bins: probabilities must be finite and in [0, 1]")
    if bins < 1:
        raise ValueError(f"calibration_bins: bins must be >= 1, got {bins}")
    confidence = np.maximum(p, 1 - p)
    correct = is_correct(p)
    edges = np.linspace(0.5, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        if mask.any():
            out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "pairs": int(mask.sum()),
                        "confidence": float(confidence[mask].mean()), "accuracy": float(correct[mask].mean())})
    return out


def expected_calibration_error(p_chosen: Sequence[float], bins: int = 10) -> float:
    """ECE of P(chosen ≻ rejected) over ``bins`` confidence bins (0 = perfectly calibrated)."""
    table = calibration_bins(p_chosen, bins)
    total = sum(b["pairs"] for b in table)
    return float(sum(b["pairs"] / total * abs(b["accuracy"] - b["confidence"]) for b in table))
