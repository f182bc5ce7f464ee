"""Reply screening: which uploaded updates may enter an aggregate. Pure functions over
arrays; a strategy logs the reason and leaves a rejected update out.

Before a reply is read, its arrays' declared shapes, dtypes and byte sizes must fit the
method's largest upload (``declared_problem``), so that an oversized reply is rejected
without being converted. Once read, an update is rejected when its keys or shapes
differ from what a client of its rank uploads, when it holds NaN or Inf, when the
root-mean-square entry of the update it applies to the shared state
(``Method.applied_size``: Fed-ALoRA's B2 B1, FlexLoRA's s B A) exceeds
``max-update-rms``, or when that RMS exceeds ``max-norm-ratio`` times the median RMS
of the round's well-formed updates (with at least 3 of them, so that a median means
something). RMS rather than the Frobenius norm, so that clients of different ranks
compare fairly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from .aggregation import LORA_A, LORA_B, modules_of, product_norm

Shapes = Mapping[str, tuple[int, ...]]
#: Bytes an array's serialised form may hold beyond its entries (the .npy header).
HEADER_BYTES = 1024


class Declared(NamedTuple):
    """What a reply says of one array before it is read: shape, dtype name, byte size."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def declared_problem(arrays: Mapping[str, Declared], bounds: Shapes) -> str | None:
    """Why a reply's arrays cannot be the upload whose largest shapes are ``bounds``
    (keys, a shape over its bound, a dtype that is not a number, more bytes than the
    declared array holds), or None; nothing is read."""
    if set(arrays) != set(bounds):
        missing, extra = sorted(set(bounds) - set(arrays)), sorted(set(arrays) - set(bounds))
        return f"keys differ from the expected upload (missing {missing[:2]}, extra {extra[:2]})"
    for key, bound in bounds.items():
        shape, dtype, nbytes = arrays[key]
        if len(shape) != len(bound) or any(n > b for n, b in zip(shape, bound, strict=True)):
            return f"'{key}' declares shape {tuple(shape)}, over the expected {tuple(bound)}"
        try:
            kind = np.dtype(dtype)
        except TypeError:
            return f"'{key}' declares dtype {dtype!r}, not a numpy number type"
        if kind.kind not in "fiub" or kind.itemsize > 8:
            return f"'{key}' declares dtype {dtype!r}, not a numpy number type"
        if nbytes > math.prod(shape) * kind.itemsize + HEADER_BYTES:
            return (
                f"'{key}' carries {nbytes} bytes, more than a {tuple(shape)} {dtype} array "
                "holds; rejected unread"
            )
    return None


def update_size(update: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """(root-mean-square entry, L2 norm) over the float arrays of an update (float64
    sums); integer arrays (a sparse upload's mask) are not values."""
    values = [
        a.ravel().astype(np.float64) for a in update.values() if np.issubdtype(a.dtype, np.floating)
    ]
    total = sum(float(np.dot(v, v)) for v in values)
    count = sum(v.size for v in values)
    return float(np.sqrt(total / max(count, 1))), float(np.sqrt(total))


def product_size(update: Mapping[str, np.ndarray], scale: float) -> tuple[float, float]:
    """``update_size`` of s B A over the layers of a LoRA update, from each layer's r x r
    Gram matrices (``product_norm``): no d_out x d_in product is formed."""
    modules = modules_of(update)
    squares = sum(product_norm(update[m + LORA_A], update[m + LORA_B], scale) ** 2 for m in modules)
    count = sum(update[m + LORA_B].shape[0] * update[m + LORA_A].shape[1] for m in modules)
    return math.sqrt(squares / max(count, 1)), math.sqrt(squares)


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


def norm_problems(
    sizes: list[tuple[float, float]], max_rms: float, max_ratio: float
) -> list[str | None]:
    """Per well-formed update (given its ``update_size``), why its size is implausible,
    or None: an RMS entry over ``max_rms``, or over ``max_ratio`` times the round's median
    (needs at least 3 updates; ``max_ratio`` 0 turns that check off)."""
    rms = [size[0] for size in sizes]
    check = bool(max_ratio) and len(rms) >= 3
    median = float(np.median(rms)) if check else 0.0
    median_norm = float(np.median([size[1] for size in sizes])) if check else 0.0
    problems: list[str | None] = []
    for value, norm in sizes:
        if value > max_rms:
            problems.append(
                f"its update's RMS entry {value:.3g} (L2 norm {norm:.3g}) exceeds "
                f"max-update-rms={max_rms:g}"
            )
        elif check and value > max_ratio * median:
            problems.append(
                f"its update's RMS entry {value:.3g} (L2 norm {norm:.3g}) is over "
                f"max-norm-ratio={max_ratio:g} times the round's median {median:.3g} "
                f"(median L2 norm {median_norm:.3g})"
            )
        else:
            problems.append(None)
    return problems
