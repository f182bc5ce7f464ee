"""The uncertainty of a comparison: a mean with its Student-t confidence interval over
independent repetitions (seeds, or groups of a paired design), and paired differences.

With n repetitions x_1..x_n, mean m and sample standard deviation s, the interval is
m -/+ t_{(1+c)/2, n-1} s / sqrt(n). An interval that contains 0 does not resolve a
difference: "no difference resolved" is then the reading, not a trend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval (NaN bounds with fewer than 2 values)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval resolves a difference from 0 (False when undefined)."""
        return bool(self.low > 0 or self.high < 0)

    def __str__(self) -> str:
        if math.isnan(self.low):
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} ± {self.half_width:.3f}"


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` and its two-sided Student-t ``confidence`` interval;
    NaN values are left out."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence)
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, int(x.size), confidence)
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, int(x.size), confidence)


def paired_difference(
    values: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
) -> Interval:
    """The mean of ``values[i] - baseline[i]`` (pairs: the same seed, or the same group)
    and its interval; pairs with a NaN are left out."""
    a, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    return mean_interval(a - b, confidence)
