"""Reply screening's pure checks (``fedalora.screening``) against hand-built updates: a
reply's declared arrays, an update's form, its size and the round's norm outliers."""

import numpy as np
import pytest

from fedalora.screening import (
    HEADER_BYTES,
    Declared,
    declared_problem,
    norm_problems,
    product_size,
    update_problem,
    update_size,
)

BOUNDS = {"l0.q.lora_B": (8, 4), "l0.v.lora_B": (8, 4)}


def _declared(shape=(8, 4), dtype="float32", extra_bytes=0) -> dict[str, Declared]:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize if dtype != "object" else 0
    return {key: Declared(shape, dtype, size + extra_bytes) for key in BOUNDS}


def test_declared_arrays_within_their_bounds_pass_and_smaller_ranks_too():
    assert declared_problem(_declared(), BOUNDS) is None
    assert declared_problem(_declared(shape=(8, 2)), BOUNDS) is None
    assert declared_problem(_declared(extra_bytes=HEADER_BYTES), BOUNDS) is None


@pytest.mark.parametrize(
    "declared, says",
    [
        ({"l0.q.lora_B": Declared((8, 4), "float32", 128)}, "missing ['l0.v.lora_B']"),
        (_declared(shape=(8, 5)), "over the expected (8, 4)"),
        (_declared(shape=(8, 4, 1)), "over the expected (8, 4)"),
        (_declared(dtype="object"), "not a numpy number type"),
        (_declared(dtype="complex128"), "not a numpy number type"),
        (_declared(extra_bytes=HEADER_BYTES + 1), "rejected unread"),
    ],
)
def test_a_declared_array_that_cannot_be_the_upload_is_named(declared, says):
    assert says in declared_problem(declared, BOUNDS)


def test_update_problem_names_keys_shapes_dtypes_and_non_finite_values():
    good = {k: np.zeros(s, np.float32) for k, s in BOUNDS.items()}
    assert update_problem(good, BOUNDS) is None
    assert "extra ['x']" in update_problem({**good, "x": np.zeros(1)}, BOUNDS)
    wrong_shape = {**good, "l0.q.lora_B": np.zeros((8, 3), np.float32)}
    assert "has shape (8, 3), expected (8, 4)" in update_problem(wrong_shape, BOUNDS)
    integers = {**good, "l0.q.lora_B": np.zeros((8, 4), np.int32)}
    assert "expected a float array" in update_problem(integers, BOUNDS)
    nan = {**good, "l0.v.lora_B": np.full((8, 4), np.nan, np.float32)}
    assert update_problem(nan, BOUNDS) == "'l0.v.lora_B' contains NaN or Inf"


def test_update_size_is_the_rms_and_l2_norm_of_the_float_entries_only():
    update = {"a": np.array([3.0, 4.0]), "mask": np.array([100, 100], np.int64)}
    assert update_size(update) == pytest.approx((np.sqrt(12.5), 5.0))


def test_product_size_is_the_size_of_s_b_a_without_forming_it():
    rng = np.random.default_rng(0)
    update = {
        f"l{i}.q{part}": rng.normal(size=shape)
        for i in range(2)
        for part, shape in ((".lora_A", (3, 6)), (".lora_B", (5, 3)))
    }
    products = [0.5 * update[f"l{i}.q.lora_B"] @ update[f"l{i}.q.lora_A"] for i in range(2)]
    dense = np.concatenate([p.ravel() for p in products])
    expected = (np.sqrt(np.mean(dense**2)), np.linalg.norm(dense))
    assert product_size(update, 0.5) == pytest.approx(expected)


def test_norm_problems_bound_the_rms_and_compare_with_the_median_from_three_updates():
    sizes = [(1.0, 10.0), (1.2, 12.0), (5.0, 50.0)]
    problems = norm_problems(sizes, max_rms=100.0, max_ratio=4.0)
    assert problems[:2] == [None, None]
    assert "over max-norm-ratio=4 times the round's median 1.2" in problems[2]
    assert norm_problems(sizes[1:], max_rms=100.0, max_ratio=4.0) == [None, None]  # no median
    assert norm_problems(sizes, max_rms=100.0, max_ratio=0.0) == [None, None, None]  # off
    capped = norm_problems(sizes, max_rms=2.0, max_ratio=0.0)
    assert capped[:2] == [None, None] and "exceeds max-update-rms=2" in capped[2]
