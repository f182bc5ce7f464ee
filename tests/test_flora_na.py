"""FLoRA-NA (Nguyen et al., arXiv:2509.26399): the server's mixtures of the clients'
factors bring B A closer to the weighted mean of the clients' products than FedIT's
averages do; the objective is written out here with dense products in numpy."""

import itertools

import numpy as np
import pytest

from fedalora.errors import ConfigError
from fedalora.methods import Participant

from .conftest import tiny_config

D_OUT, D_IN, RANK = 9, 7, 3
CLIENTS = [Participant(i, RANK, n) for i, n in enumerate([10, 30, 20, 40])]
WEIGHTS = np.array([10, 30, 20, 40]) / 100


def _method(**overrides):
    return tiny_config(strategy="flora-na", ranks=str(RANK), **overrides).method


def _gap(a, b, updates):
    """||B A - sum p_u B_u A_u||_F, dense."""
    target = sum(
        w * u["q.lora_B"].astype(np.float64) @ u["q.lora_A"]
        for w, u in zip(WEIGHTS, updates, strict=True)
    )
    return np.linalg.norm(b.astype(np.float64) @ a - target)


def _updates(rng, shared_a=None):
    return [
        {
            "q.lora_A": shared_a if shared_a is not None else rng.normal(size=(RANK, D_IN)),
            "q.lora_B": rng.normal(size=(D_OUT, RANK)),
        }
        for _ in CLIENTS
    ]


def test_the_estimate_is_closer_to_the_mean_product_than_fedit_and_improves_with_sweeps():
    updates = _updates(np.random.default_rng(0))
    fedit = tiny_config(strategy="fedit", ranks=str(RANK)).method.aggregate({}, updates, CLIENTS)
    gaps = []
    for sweeps in (0, 1, 5, 20):
        shared = _method(**{"flora-na-sweeps": sweeps}).aggregate({}, updates, CLIENTS)
        gaps.append(_gap(shared["q.lora_A"], shared["q.lora_B"], updates))
        # A and B are mixtures of the clients' own factors (in their span)
        for factor in ("A", "B"):
            stack = np.stack([u[f"q.lora_{factor}"].ravel() for u in updates], axis=1)
            mix = np.linalg.lstsq(stack, shared[f"q.lora_{factor}"].ravel(), rcond=None)[0]
            np.testing.assert_allclose(stack @ mix, shared[f"q.lora_{factor}"].ravel(), atol=1e-4)
    assert gaps[0] == pytest.approx(_gap(fedit["q.lora_A"], fedit["q.lora_B"], updates))
    assert all(later <= earlier + 1e-6 for earlier, later in itertools.pairwise(gaps))
    assert gaps[-1] < 0.9 * gaps[0]


def test_clients_that_share_a_are_averaged_exactly():
    rng = np.random.default_rng(1)
    updates = _updates(rng, shared_a=rng.normal(size=(RANK, D_IN)))
    shared = _method().aggregate({}, updates, CLIENTS)
    assert _gap(shared["q.lora_A"], shared["q.lora_B"], updates) < 1e-4


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"ranks": "8,4"}, "fedalora-hetero"),
        ({"dp-noise-multiplier": 1.0}, "coefficients"),
        ({"flora-na-sweeps": -1}, "flora-na-sweeps"),
    ],
)
def test_what_flora_na_cannot_do_is_refused_before_training(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_config(strategy="flora-na", **{"ranks": str(RANK), **overrides})
