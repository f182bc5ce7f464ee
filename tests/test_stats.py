"""Confidence intervals against hand-computed values."""

import math

import pytest

from fedalora.stats import mean_interval, paired_difference


def test_the_t_interval_by_hand():
    # [1, 2, 3, 4]: mean 2.5, sd 1.290994, t(0.975, 3) = 3.182446 -> half width 2.054260
    interval = mean_interval([1, 2, 3, 4])
    assert interval.mean == 2.5 and interval.n == 4
    assert interval.low == pytest.approx(0.445740, abs=1e-6)
    assert interval.high == pytest.approx(4.554260, abs=1e-6)
    assert str(interval) == "2.500 ± 2.054"
    # 90%: t(0.95, 3) = 2.353363 -> half width 1.519089
    assert mean_interval([1, 2, 3, 4], 0.9).half_width == pytest.approx(1.519089, abs=1e-6)


def test_few_values_give_no_interval_and_nan_is_left_out():
    single = mean_interval([0.7, math.nan])
    assert single.mean == 0.7 and single.n == 1 and math.isnan(single.low)
    assert str(single) == "0.700" and not single.excludes_zero
    assert mean_interval([]).n == 0


def test_paired_differences_resolve_or_not():
    # differences 0.1, 0.12, 0.08: mean 0.1, sd 0.02, t(0.975, 2) = 4.302653
    resolved = paired_difference([0.6, 0.62, 0.58], [0.5, 0.5, 0.5])
    assert resolved.mean == pytest.approx(0.1)
    assert resolved.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert resolved.excludes_zero
    assert not paired_difference([0.6, 0.4, 0.55], [0.5, 0.5, 0.5]).excludes_zero
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([0.1, 0.2], [0.1])
