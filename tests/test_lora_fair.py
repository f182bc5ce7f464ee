"""LoRA-FAIR (Bian, Wang, Zhang and Xu, ICCV 2025, arXiv:2411.14961): the server's
refined B brings the product of the averaged factors closer, in the paper's objective,
to the average of the clients' products; its objective is written out here in numpy."""

import numpy as np
import pytest

from fedalora.errors import ConfigError
from fedalora.methods import Participant

from .conftest import tiny_config

D_OUT, D_IN, RANK = 7, 6, 3
CLIENTS = [Participant(0, RANK, 10), Participant(1, RANK, 30), Participant(2, RANK, 20)]
WEIGHTS = np.array([10, 30, 20]) / 60


def _method(**overrides):
    return tiny_config(strategy="lora-fair", ranks=str(RANK), **overrides).method


def _objective(b, a, target, lam, b_mean):
    """1 - mean over columns of cos(target, B A) + lambda ||B - B_mean||_F^2."""
    product = b.astype(np.float64) @ a.astype(np.float64)
    cosine = (target * product).sum(0) / (
        np.linalg.norm(target, axis=0) * np.linalg.norm(product, axis=0)
    )
    return 1 - cosine.mean() + lam * np.square(b - b_mean).sum()


def _updates(rng, shared_a=None):
    return [
        {
            "q.lora_A": shared_a if shared_a is not None else rng.normal(size=(RANK, D_IN)),
            "q.lora_B": rng.normal(size=(D_OUT, RANK)),
        }
        for _ in CLIENTS
    ]


def test_refined_b_lowers_the_papers_objective_and_keeps_the_average_of_a():
    method, rng = (
        _method(**{"lora-fair-steps": 2000, "lora-fair-lr": 0.5}),
        np.random.default_rng(0),
    )
    updates = _updates(rng)
    a_mean = sum(w * u["q.lora_A"] for w, u in zip(WEIGHTS, updates, strict=True))
    b_mean = sum(w * u["q.lora_B"] for w, u in zip(WEIGHTS, updates, strict=True))
    target = sum(w * u["q.lora_B"] @ u["q.lora_A"] for w, u in zip(WEIGHTS, updates, strict=True))
    shared = method.aggregate({}, updates, CLIENTS)
    np.testing.assert_allclose(shared["q.lora_A"], a_mean, rtol=1e-5, atol=1e-6)
    lam = method.options.lora_fair_lambda
    before = _objective(b_mean, a_mean, target, lam, b_mean)
    after = _objective(shared["q.lora_B"], a_mean, target, lam, b_mean)
    assert after < before - 1e-3  # FedIT's average is not a minimiser: the refinement moves

    # and its product points closer to the clients' average product (the paper's aim)
    def cos(b):  # of the whole matrices
        product = b @ a_mean
        return np.sum(target * product) / (np.linalg.norm(target) * np.linalg.norm(product))

    assert cos(shared["q.lora_B"]) > cos(b_mean)


def test_clients_that_share_a_need_no_correction():
    """With one A, B A is already the average of the products: B stays FedIT's."""
    method, rng = _method(), np.random.default_rng(1)
    updates = _updates(rng, shared_a=rng.normal(size=(RANK, D_IN)))
    shared = method.aggregate({}, updates, CLIENTS)
    b_mean = sum(w * u["q.lora_B"] for w, u in zip(WEIGHTS, updates, strict=True))
    np.testing.assert_allclose(shared["q.lora_B"], b_mean, rtol=1e-5, atol=1e-6)


def test_zero_steps_is_fedit():
    rng = np.random.default_rng(2)
    updates = _updates(rng)
    refined = _method(**{"lora-fair-steps": 0}).aggregate({}, updates, CLIENTS)
    fedit = tiny_config(strategy="fedit", ranks=str(RANK)).method.aggregate({}, updates, CLIENTS)
    assert all(np.array_equal(refined[k], fedit[k]) for k in fedit)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"ranks": "8,4"}, "fedalora-hetero"),
        ({"dp-noise-multiplier": 1.0}, "correction"),
        ({"lora-fair-lr": 0.0}, "lora-fair-lr"),
        ({"dora": True}, "dora"),
    ],
)
def test_what_lora_fair_cannot_do_is_refused_before_training(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_config(strategy="lora-fair", **{"ranks": str(RANK), **overrides})
