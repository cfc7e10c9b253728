"""Expected calibration error on hand-made probabilities."""

import numpy as np
import pytest

from gram_core.calibration import calibration_bins, expected_calibration_error


def test_perfectly_calibrated_predictions_have_zero_ece():
    # 10 pairs at P = 0.8: 8 right (P > .5), 2 wrong (P < .5, confidence 0.8 as well)
    p = [0.8] * 8 + [0.2] * 2
    assert expected_calibration_error(p) == pytest.approx(0.0, abs=1e-12)


def test_overconfident_predictions():
    p = [0.99] * 5 + [0.01] * 5  # confidence 0.99, accuracy 0.5
    assert expected_calibration_error(p) == pytest.approx(0.49)


def test_bins_weight_by_size_and_ties_count_wrong():
    p = [0.5, 0.5, 0.95, 0.95]  # bin [.5,.55): conf .5, acc 0; bin [.95,1]: conf .95, acc 1
    bins = calibration_bins(p, bins=10)
    assert [b["pairs"] for b in bins] == [2, 2]
    assert expected_calibration_error(p, bins=10) == pytest.approx(0.5 * 0.5 + 0.5 * 0.05)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        expected_calibration_error([])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        expected_calibration_error([1.2])
    assert 0 <= expected_calibration_error(np.random.default_rng(0).random(100)) <= 0.5
