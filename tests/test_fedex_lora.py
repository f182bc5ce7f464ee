"""FedEx-LoRA (Singhal, Ponkshe and Vepakomma, ACL 2025, arXiv:2410.09432): the global
update is exactly the weighted average of the clients' updates, checked from the
paper's equations on random arrays and on a client's layers."""

import numpy as np
import pytest
import torch

from fedalora.adapters import export_peft_adapter, load_peft_adapter
from fedalora.errors import ConfigError
from fedalora.methods import Participant
from fedalora.models import load_base_model

from .conftest import tiny_config

D_OUT, D_IN, RANK = 6, 5, 3
LAYERS = ("q", "v")


def _method(**overrides):
    return tiny_config(strategy="fedex-lora", ranks=str(RANK), **overrides).method


def _frozen_part(shared, module):
    """R: what the global model adds to W0 outside its LoRA (zero before round 1)."""
    return shared.get(f"{module}.residual", np.zeros((D_OUT, D_IN))).astype(np.float64)


def _global_update(shared, module, scale):
    """W - W0 of the global model: R + s B A."""
    a, b = (shared[f"{module}.lora_{n}"].astype(np.float64) for n in "AB")
    return _frozen_part(shared, module) + scale * b @ a


def _random_factors(rng):
    return {
        f"{m}.lora_{n}": rng.normal(size=shape).astype(np.float32)
        for m in LAYERS
        for n, shape in (("A", (RANK, D_IN)), ("B", (D_OUT, RANK)))
    }


def test_global_update_is_the_weighted_average_of_the_clients_products():
    method, rng = _method(), np.random.default_rng(0)
    scale = method.scaling.scale(RANK)
    clients = [Participant(i, RANK, n) for i, n in enumerate([30, 10, 60, 5])]
    weights = np.array([c.num_examples for c in clients], np.float64) / 105
    shared = method.initial_shared(dict.fromkeys(LAYERS, (D_OUT, D_IN)), [RANK] * 4)
    assert not any(k.endswith(".residual") for k in shared)  # R = 0 is not sent
    for _ in range(3):  # the residual accumulates over rounds
        updates = [_random_factors(rng) for _ in clients]
        frozen = {m: _frozen_part(shared, m) for m in LAYERS}
        shared = method.aggregate(shared, updates, clients)
        for m in LAYERS:
            # client i trained from W0 + R and ends at W0 + R + s B_i A_i
            local = [
                frozen[m] + scale * u[f"{m}.lora_B"].astype(np.float64) @ u[f"{m}.lora_A"]
                for u in updates
            ]
            expected = sum(w * x for w, x in zip(weights, local, strict=True))
            np.testing.assert_allclose(
                _global_update(shared, m, scale), expected, rtol=1e-5, atol=1e-5
            )
            for factor in "AB":  # the factors are FedIT's averages
                key = f"{m}.lora_{factor}"
                mean = sum(w * u[key] for w, u in zip(weights, updates, strict=True))
                np.testing.assert_allclose(shared[key], mean, rtol=1e-5, atol=1e-6)


def _trained_adapter(method, base, shared, seed):
    torch.manual_seed(seed)
    adapter = method.make_adapter(base, RANK, 0.0)
    method.install(adapter, shared, 0)
    method.start_round(adapter)
    optimizer = torch.optim.SGD([p for p in adapter.model.parameters() if p.requires_grad], 0.5)
    ids = torch.randint(len(base.tokenizer), (4, 12), generator=torch.Generator().manual_seed(seed))
    loss = adapter.model(input_ids=ids, labels=torch.arange(4) % 5).loss
    loss.backward()
    optimizer.step()
    return adapter


def test_a_client_starts_from_the_exact_average_and_exports_it(tmp_path):
    """Two clients train apart; the next round's client's layers give the weighted
    average of their layers' outputs, and its exported PEFT adapter gives its logits."""
    method = _method()
    base = load_base_model("minilm", 5, num_hidden_layers=2)
    shared = method.initial_shared(base.layer_shapes(), [RANK, RANK])
    trained = [_trained_adapter(method, base, shared, seed) for seed in (1, 2)]
    clients = [Participant(0, RANK, 30), Participant(1, RANK, 10)]
    shared = method.aggregate(shared, [method.upload(a) for a in trained], clients)
    assert all(np.abs(v).max() > 0 for k, v in shared.items() if k.endswith(".residual"))

    adapter = method.make_adapter(base, RANK, 0.0)
    method.install(adapter, method.download(shared, clients[0]), 1)
    method.start_round(adapter)
    x = torch.randn(3, base.layer_shapes()[adapter.targets[0]][1])
    with torch.no_grad():
        for m in adapter.targets:
            layer_outputs = [a.layer(m)(x) for a in trained]
            expected = 0.75 * layer_outputs[0] + 0.25 * layer_outputs[1]
            torch.testing.assert_close(adapter.layer(m)(x), expected, rtol=1e-4, atol=1e-5)

    export_peft_adapter(method.export_factors(adapter), adapter, base.model, tmp_path / "peft")
    exported = load_peft_adapter(base.model, tmp_path / "peft").eval()
    ids = torch.randint(len(base.tokenizer), (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = adapter.model.eval()(input_ids=ids).logits, exported(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"ranks": "8,4"}, "fedalora-hetero"),  # names the methods that take ranks
        ({"dp-noise-multiplier": 1.0}, "residual"),
        ({"dora": True}, "dora"),
    ],
)
def test_what_fedex_lora_cannot_do_is_refused_before_training(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_config(strategy="fedex-lora", **{"ranks": str(RANK), **overrides})
