"""Aggregation rules on hand-computed cases and random matrices (no Flower, no model)."""

import tracemalloc

import numpy as np
import pytest

from fedalora.aggregation import (
    accumulate_decomposed,
    data_weights,
    flexlora_factors,
    flora_stack,
    hetlora_average,
    lora_product_sum,
    product_norm,
    truncate_rank,
    weighted_average,
    zero_pad_average,
)
from fedalora.methods.lora_factors import seeded_lora_a


def test_data_weights_normalise_counts():
    np.testing.assert_allclose(data_weights([1, 3]), [0.25, 0.75])
    with pytest.raises(ValueError, match="positive total"):
        data_weights([0, 0])


def test_weighted_average_by_hand():
    b1 = {"q.lora_B": np.array([[1.0, 2.0]], np.float32)}
    b2 = {"q.lora_B": np.array([[5.0, -2.0]], np.float32)}
    out = weighted_average([b1, b2], [30, 10])  # p = 0.75, 0.25
    np.testing.assert_allclose(out["q.lora_B"], [[0.75 * 1 + 0.25 * 5, 0.75 * 2 - 0.25 * 2]])


def test_weighted_average_rejects_mismatched_keys():
    with pytest.raises(ValueError, match="different keys"):
        weighted_average([{"a": np.ones(1)}, {"b": np.ones(1)}], [1, 1])


def test_accumulate_decomposed_by_hand_with_different_ranks():
    b0 = {"q.B0": np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)}  # d_out=2, d_m=2
    rank1 = {"q.B2": np.array([[1.0], [2.0]]), "q.B1": np.array([[3.0, 4.0]])}  # r=1
    rank2 = {
        "q.B2": np.array([[1.0, 0.0], [0.0, 1.0]]),  # r=2
        "q.B1": np.array([[2.0, 0.0], [0.0, 2.0]]),
    }
    out = accumulate_decomposed(b0, [rank1, rank2], [1, 3])  # p = 0.25, 0.75
    # B2_1 B1_1 = [[3,4],[6,8]]; B2_2 B1_2 = 2 I
    expected = np.array([[1 + 0.25 * 3 + 0.75 * 2, 0.25 * 4], [0.25 * 6, 1 + 0.25 * 8 + 0.75 * 2]])
    np.testing.assert_allclose(out["q.B0"], expected, rtol=1e-6)


def test_accumulate_decomposed_matches_definition_on_random_matrices():
    rng = np.random.default_rng(0)
    d_out, d_m, ranks, counts = 6, 4, [5, 3, 1], [10, 20, 70]
    b0 = {"l.B0": rng.normal(size=(d_out, d_m)).astype(np.float32)}
    updates = [
        {"l.B2": rng.normal(size=(d_out, r)), "l.B1": rng.normal(size=(r, d_m))} for r in ranks
    ]
    expected = b0["l.B0"] + sum(
        n / 100 * u["l.B2"] @ u["l.B1"] for n, u in zip(counts, updates, strict=True)
    )
    np.testing.assert_allclose(
        accumulate_decomposed(b0, updates, counts)["l.B0"], expected, rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------- LoRA baselines
D_OUT, D_IN = 7, 9


def _lora_updates(ranks, seed=0, factors=("A", "B")):
    rng = np.random.default_rng(seed)
    return [
        {
            **({"l.lora_A": rng.normal(size=(r, D_IN))} if "A" in factors else {}),
            **({"l.lora_B": rng.normal(size=(D_OUT, r))} if "B" in factors else {}),
        }
        for r in ranks
    ]


def _exact(updates, counts, scales):
    p = np.asarray(counts, float) / sum(counts)
    return sum(
        pi * s * u["l.lora_B"] @ u["l.lora_A"] for pi, s, u in zip(p, scales, updates, strict=True)
    )


def test_flora_stack_aggregates_exactly():
    ranks, counts, scales = [5, 3, 1], [10, 20, 70], [2.0, 0.5, 1.0]
    updates = _lora_updates(ranks)
    stack = flora_stack(updates, counts, scales)
    assert stack["l.stack_A"].shape == (9, D_IN) and stack["l.stack_B"].shape == (D_OUT, 9)
    np.testing.assert_allclose(
        stack["l.stack_B"].astype(float) @ stack["l.stack_A"],
        _exact(updates, counts, scales),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        lora_product_sum(updates, counts, scales, "l"), _exact(updates, counts, scales), rtol=1e-12
    )


def test_seeded_a_is_nested_across_ranks_and_shared_by_seed():
    big = seeded_lora_a(7, "l", 8, D_IN)
    np.testing.assert_array_equal(seeded_lora_a(7, "l", 3, D_IN), big[:3])
    assert not np.array_equal(seeded_lora_a(8, "l", 3, D_IN), big[:3])
    assert not np.array_equal(seeded_lora_a(7, "other", 3, D_IN), big[:3])
    assert np.abs(big).max() <= 1 / np.sqrt(D_IN)  # PEFT's kaiming-uniform(a=sqrt 5) bound


def test_ffa_lora_aggregates_exactly_with_nested_frozen_a():
    ranks, counts = [5, 3, 1], [10, 20, 70]
    a_max = seeded_lora_a(0, "l", 5, D_IN).astype(float)
    updates = _lora_updates(ranks, factors=("B",))
    b = zero_pad_average(updates, counts, 5, slots="all")["l.lora_B"]
    exact = sum(
        n / 100 * u["l.lora_B"] @ a_max[: u["l.lora_B"].shape[1]]
        for n, u in zip(counts, updates, strict=True)
    )
    np.testing.assert_allclose(b @ a_max, exact, rtol=1e-5, atol=1e-6)


def test_flexlora_gives_each_client_its_best_rank_r_approximation():
    ranks, counts, scales = [6, 4, 2], [30, 30, 40], [1.0, 0.5, 2.0]
    updates = _lora_updates(ranks, seed=1)
    delta = _exact(updates, counts, scales)
    singular = np.linalg.svd(delta, compute_uv=False)
    factors = flexlora_factors(updates, counts, scales, max(ranks))
    for rank, scale in zip(ranks, scales, strict=True):
        mine = truncate_rank(factors, rank, 1 / scale)
        assert mine["l.lora_A"].shape == (rank, D_IN) and mine["l.lora_B"].shape == (D_OUT, rank)
        approx = scale * mine["l.lora_B"].astype(float) @ mine["l.lora_A"]
        # Eckart-Young: the error is exactly the tail of the singular values.
        np.testing.assert_allclose(
            np.linalg.norm(delta - approx) ** 2, np.sum(singular[rank:] ** 2), rtol=1e-4
        )


def test_fedit_is_biased_when_clients_differ():
    counts = [1, 1]
    updates = _lora_updates([3, 3], seed=2)
    avg = weighted_average(updates, counts)
    fedit = avg["l.lora_B"].astype(float) @ avg["l.lora_A"]
    assert np.linalg.norm(fedit - _exact(updates, counts, [1, 1])) > 0.1
    same = [updates[0], updates[0]]  # identical clients: no bias
    avg = weighted_average(same, counts)
    np.testing.assert_allclose(
        avg["l.lora_B"].astype(float) @ avg["l.lora_A"],
        _exact(same, counts, [1, 1]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_zero_padding_by_hand():
    rank2 = {
        "q.lora_A": np.array([[1.0, 1.0], [2.0, 2.0]]),  # r=2, d_in=2
        "q.lora_B": np.array([[1.0, 4.0]]),
    }  # d_out=1
    rank1 = {"q.lora_A": np.array([[3.0, 5.0]]), "q.lora_B": np.array([[7.0]])}
    holders = zero_pad_average([rank2, rank1], [1, 3], 2, slots="holders")  # p = .25, .75
    np.testing.assert_allclose(holders["q.lora_A"], [[0.25 + 2.25, 0.25 + 3.75], [2.0, 2.0]])
    np.testing.assert_allclose(holders["q.lora_B"], [[0.25 + 5.25, 4.0]])
    everyone = zero_pad_average([rank2, rank1], [1, 3], 2, slots="all")
    np.testing.assert_allclose(everyone["q.lora_A"], [[2.5, 4.0], [0.5, 0.5]])
    np.testing.assert_allclose(everyone["q.lora_B"], [[5.5, 1.0]])
    client1 = truncate_rank(everyone, 1)
    np.testing.assert_allclose(client1["q.lora_A"], [[2.5, 4.0]])
    np.testing.assert_allclose(client1["q.lora_B"], [[5.5]])


def test_hetlora_weights_by_update_norm_by_hand():
    small = {"q.lora_A": np.array([[1.0, 0.0]]), "q.lora_B": np.array([[1.0]])}  # ||BA|| = 1
    big = {
        "q.lora_A": np.array([[0.0, 1.0], [0.0, 0.0]]),
        "q.lora_B": np.array([[3.0, 5.0]]),
    }  # BA = [[0, 3]], ||BA|| = 3
    out = hetlora_average([small, big], [1.0, 1.0], 2)  # w = 1/4, 3/4
    np.testing.assert_allclose(out["q.lora_A"], [[0.25, 0.75], [0.0, 0.0]])
    np.testing.assert_allclose(out["q.lora_B"], [[0.25 + 2.25, 3.75]])
    doubled = hetlora_average([small, big], [3.0, 1.0], 2)  # s_1 = 3: norms 3, 3
    np.testing.assert_allclose(doubled["q.lora_B"], [[0.5 + 1.5, 2.5]])


def test_product_norm_matches_the_dense_norm():
    u = _lora_updates([4], seed=3)[0]
    assert np.isclose(
        product_norm(u["l.lora_A"], u["l.lora_B"], 2.0),
        np.linalg.norm(2.0 * u["l.lora_B"] @ u["l.lora_A"]),
    )


def _peak_bytes(rule, *args) -> int:
    """Peak memory that numpy allocated while ``rule(*args)`` ran."""
    tracemalloc.start()
    try:
        rule(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


D = 2048  # a dense float64 d x d update would take 32 MiB
RANKS = (4, 2, 1)


def _wide_updates(ranks=RANKS):
    rng = np.random.default_rng(0)
    return [
        {
            "l.lora_A": rng.standard_normal((r, D)).astype(np.float32),
            "l.lora_B": rng.standard_normal((D, r)).astype(np.float32),
        }
        for r in ranks
    ]


@pytest.mark.parametrize(
    "rule, args",
    [
        (zero_pad_average, (_wide_updates(), [1, 2, 3], 4, "holders")),
        (zero_pad_average, (_wide_updates(), [1, 2, 3], 4, "all")),
        (hetlora_average, (_wide_updates(), [2.0, 2.0, 2.0], 4)),
        (weighted_average, (_wide_updates((4, 4, 4)), [1, 2, 3])),
        (flora_stack, (_wide_updates(), [1, 2, 3], [2.0, 2.0, 2.0])),
        (
            accumulate_decomposed,
            (
                {"l.B0": np.zeros((D, 8), np.float32)},
                [
                    {"l.B2": np.ones((D, r), np.float32), "l.B1": np.ones((r, 8), np.float32)}
                    for r in RANKS
                ],
                [1, 2, 3],
            ),
        ),
    ],
    ids=["zeropad", "zeropad-all", "hetlora", "fedavg", "flora", "fedalora-hetero"],
)
def test_rules_that_need_no_dense_update_never_build_one(rule, args):
    assert _peak_bytes(rule, *args) < D * D * 8 / 16


def test_the_exact_dense_update_is_built_only_where_a_rule_needs_it():
    """FlexLoRA's SVD needs sum_i p_i s_i B_i A_i densely: the guard above would catch it."""
    peak = _peak_bytes(lora_product_sum, _wide_updates(), [1, 2, 3], [2.0] * 3, "l")
    assert peak >= D * D * 8
