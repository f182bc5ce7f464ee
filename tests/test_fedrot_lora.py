"""FedRot-LoRA (Zhang, Kim, Cha and Vikalo, PMLR vol. 306, 2026, arXiv:2602.23638): each
client's upload is its factors rotated by the orthogonal Procrustes solution against
the global factors, its product unchanged, checked against scipy's solver."""

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes

from fedalora.errors import ConfigError
from fedalora.methods import Participant
from fedalora.models import load_base_model

from .conftest import tiny_config

RANK = 4


def _method(**overrides):
    return tiny_config(strategy="fedrot-lora", ranks=str(RANK), **overrides).method


def _trained(method, base, shared, server_round):
    """A client of ``server_round`` after a few steps on random tokens."""
    torch.manual_seed(server_round)
    adapter = method.make_adapter(base, RANK, 0.0)
    adapter.server_round = server_round
    method.install(adapter, shared, 1)
    method.start_round(adapter)
    optimizer = torch.optim.SGD([p for p in adapter.model.parameters() if p.requires_grad], 0.5)
    ids = torch.randint(len(base.tokenizer), (4, 12), generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        optimizer.zero_grad()
        adapter.model(input_ids=ids, labels=torch.arange(4) % 5).loss.backward()
        optimizer.step()
    return adapter


@pytest.fixture(scope="module")
def base():
    return load_base_model("minilm", 5, num_hidden_layers=1)


@pytest.mark.parametrize("server_round, aligned", [(1, None), (2, "A"), (3, "B"), (4, "A")])
def test_upload_is_the_procrustes_rotation_of_the_trained_factors(base, server_round, aligned):
    method, rng = _method(), np.random.default_rng(0)
    layers = base.layer_shapes()
    shared = {  # a global state after some rounds: both factors non-zero
        f"{m}.lora_{n}": rng.normal(size=shape).astype(np.float32) * 0.1
        for m, (d_out, d_in) in layers.items()
        for n, shape in (("A", (RANK, d_in)), ("B", (d_out, RANK)))
    }
    adapter = _trained(method, base, shared, server_round)
    trained = adapter.arrays(("lora_A", "lora_B"))
    upload = method.upload(adapter)
    for m in layers:
        a, b = trained[f"{m}.lora_A"].astype(np.float64), trained[f"{m}.lora_B"].astype(np.float64)
        if aligned is None:
            rotation = np.eye(RANK)
        elif aligned == "A":  # min ||R^T A_i - A_g||: Procrustes of A_i^T onto A_g^T
            rotation, _ = orthogonal_procrustes(a.T, shared[f"{m}.lora_A"].T)
        else:  # min ||B_i R - B_g||
            rotation, _ = orthogonal_procrustes(b, shared[f"{m}.lora_B"])
        np.testing.assert_allclose(upload[f"{m}.lora_A"], rotation.T @ a, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(upload[f"{m}.lora_B"], b @ rotation, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(  # the client's update is unchanged
            upload[f"{m}.lora_B"] @ upload[f"{m}.lora_A"], b @ a, rtol=1e-4, atol=1e-5
        )
        if aligned:  # and the aligned factor moved towards the global one
            key = f"{m}.lora_{aligned}"
            assert np.linalg.norm(upload[key] - shared[key]) <= np.linalg.norm(
                trained[key] - shared[key]
            )


def test_soft_alignment_rotates_part_of_the_way(base):
    rng = np.random.default_rng(1)
    layers = base.layer_shapes()
    shared = {
        f"{m}.lora_{n}": rng.normal(size=shape).astype(np.float32) * 0.1
        for m, (d_out, d_in) in layers.items()
        for n, shape in (("A", (RANK, d_in)), ("B", (d_out, RANK)))
    }
    uploads = {}
    for strength in (1.0, 0.5):
        method = _method(**{"rotation-strength": strength})
        adapter = _trained(method, base, shared, 2)
        trained, uploads[strength] = adapter.arrays(("lora_A",)), method.upload(adapter)
    for m in layers:
        key, a = f"{m}.lora_A", trained[f"{m}.lora_A"].astype(np.float64)
        # R^T from the upload; proper rotation (det +1), orthogonal
        soft = uploads[0.5][key].astype(np.float64) @ np.linalg.pinv(a)
        np.testing.assert_allclose(soft @ soft.T, np.eye(RANK), atol=1e-4)
        assert np.linalg.det(soft) == pytest.approx(1.0, abs=1e-4)
        distance = {s: np.linalg.norm(u[key] - shared[key]) for s, u in uploads.items()}
        assert distance[1.0] <= distance[0.5] <= np.linalg.norm(a - shared[key]) + 1e-6


def test_server_averages_the_rotated_factors_as_fedit_does():
    method, rng = _method(), np.random.default_rng(2)
    clients = [Participant(0, RANK, 10), Participant(1, RANK, 30)]
    updates = [
        {"q.lora_A": rng.normal(size=(RANK, 5)), "q.lora_B": rng.normal(size=(6, RANK))}
        for _ in clients
    ]
    shared = method.aggregate({}, updates, clients)
    for key in ("q.lora_A", "q.lora_B"):
        np.testing.assert_allclose(shared[key], 0.25 * updates[0][key] + 0.75 * updates[1][key])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"ranks": "8,4"}, "fedalora-hetero"),
        ({"dp-noise-multiplier": 1.0}, "rotates"),
        ({"rotation-strength": 0.0}, "rotation-strength"),
    ],
)
def test_what_fedrot_lora_cannot_do_is_refused_before_training(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_config(strategy="fedrot-lora", **{"ranks": str(RANK), **overrides})
