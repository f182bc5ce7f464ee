import numpy as np
import pytest

from fedalora.aggregation import accumulate_decomposed, data_weights, weighted_average


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
    rank2 = {"q.B2": np.array([[1.0, 0.0], [0.0, 1.0]]),  # r=2
             "q.B1": np.array([[2.0, 0.0], [0.0, 2.0]])}
    out = accumulate_decomposed(b0, [rank1, rank2], [1, 3])  # p = 0.25, 0.75
    # B2_1 B1_1 = [[3,4],[6,8]]; B2_2 B1_2 = 2 I
    expected = np.array([[1 + 0.25 * 3 + 0.75 * 2, 0.25 * 4],
                         [0.25 * 6, 1 + 0.25 * 8 + 0.75 * 2]])
    np.testing.assert_allclose(out["q.B0"], expected, rtol=1e-6)


def test_accumulate_decomposed_matches_definition_on_random_matrices():
    rng = np.random.default_rng(0)
    d_out, d_m, ranks, counts = 6, 4, [5, 3, 1], [10, 20, 70]
    b0 = {"l.B0": rng.normal(size=(d_out, d_m)).astype(np.float32)}
    updates = [{"l.B2": rng.normal(size=(d_out, r)), "l.B1": rng.normal(size=(r, d_m))}
               for r in ranks]
    expected = b0["l.B0"] + sum(n / 100 * u["l.B2"] @ u["l.B1"] for n, u in zip(counts, updates))
    np.testing.assert_allclose(accumulate_decomposed(b0, updates, counts)["l.B0"], expected,
                               rtol=1e-5, atol=1e-6)
