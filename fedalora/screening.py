"""Reply screening: which uploaded updates may enter an aggregate. Pure functions over
arrays; a strategy logs the reason and leaves a rejected update out.

An update is rejected when its keys or shapes differ from what a client of its rank
uploads, when it holds NaN or Inf, when its root-mean-square entry exceeds
``max-update-rms``, or when that RMS exceeds ``max-norm-ratio`` times the median RMS
of the round's well-formed updates (with at least 3 of them, so that a median means
something). RMS rather than the Frobenius norm, so that clients of different ranks
compare fairly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Shapes = Mapping[str, tuple[int, ...]]


def update_rms(update: Mapping[str, np.ndarray]) -> float:
    """Root-mean-square entry over the float arrays of an update (float64 sums); integer
    arrays (a sparse upload's mask) are not values."""
    values = [
        a.ravel().astype(np.float64) for a in update.values() if np.issubdtype(a.dtype, np.floating)
    ]
    total = sum(float(np.dot(v, v)) for v in values)
    count = sum(v.size for v in values)
    return float(np.sqrt(total / max(count, 1)))


def update_problem(update: Mapping[str, np.ndarray], expected: Shapes) -> str | None:
    """Why an update's form makes it unusable (keys, shapes, dtype, NaN/Inf), or None."""
    if set(update) != set(expected):
        missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
        return f"keys differ from the expected upload (missing {missing[:2]}, extra {extra[:2]})"
    for key, shape in expected.items():
        if tuple(update[key].shape) != tuple(shape):
            return f"'{key}' has shape {tuple(update[key].shape)}, expected {tuple(shape)}"
        if not np.issubdtype(update[key].dtype, np.floating):
            return f"'{key}' has dtype {update[key].dtype}, expected a float array"
        if not np.all(np.isfinite(update[key])):
            return f"'{key}' contains NaN or Inf"
    return None


def norm_problems(rms: list[float], max_rms: float, max_ratio: float) -> list[str | None]:
    """Per well-formed update (given its RMS entry), why its size is implausible, or None:
    over ``max_rms``, or over ``max_ratio`` times the round's median (needs at least 3
    updates; ``max_ratio`` 0 turns that check off)."""
    median = float(np.median(rms)) if max_ratio and len(rms) >= 3 else None
    problems: list[str | None] = []
    for value in rms:
        if value > max_rms:
            problems.append(f"RMS entry {value:.3g} exceeds max-update-rms={max_rms:g}")
        elif median is not None and value > max_ratio * median:
            problems.append(
                f"RMS entry {value:.3g} is over max-norm-ratio={max_ratio:g} "
                f"times the round's median {median:.3g}"
            )
        else:
            problems.append(None)
    return problems
