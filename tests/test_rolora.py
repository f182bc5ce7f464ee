"""RoLoRA (Chen et al., NeurIPS 2025, arXiv:2502.01755): alternate rounds train and
average only B, then only A; with the other factor fixed, B A after a round is the
average of the clients' B A, checked from the paper's equations."""

import numpy as np
import pytest
import torch

from fedalora.errors import ConfigError
from fedalora.methods import Participant
from fedalora.models import load_base_model

from .conftest import tiny_config

D_OUT, D_IN, RANK = 6, 5, 3
CLIENTS = [Participant(0, RANK, 10), Participant(1, RANK, 30), Participant(2, RANK, 60)]
WEIGHTS = np.array([0.1, 0.3, 0.6])


def _method():
    return tiny_config(strategy="rolora", ranks=str(RANK)).method


def test_each_round_averages_one_factor_and_the_product_exactly():
    method, rng = _method(), np.random.default_rng(0)
    shared = method.initial_shared({"q": (D_OUT, D_IN)}, [RANK] * 3)
    for server_round in (1, 2, 3, 4):
        trained = "B" if server_round % 2 else "A"
        shapes = method.upload_shapes({"q": (D_OUT, D_IN)}, RANK, server_round)
        assert list(shapes) == [f"q.lora_{trained}"]
        updates = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in CLIENTS]
        # each client's model: its trained factor with the shared frozen one
        local = [
            (u["q.lora_B"] @ shared["q.lora_A"])
            if trained == "B"
            else shared["q.lora_B"] @ u["q.lora_A"]
            for u in updates
        ]
        new = method.aggregate(shared, updates, CLIENTS)
        frozen = "A" if trained == "B" else "B"
        np.testing.assert_array_equal(new[f"q.lora_{frozen}"], shared[f"q.lora_{frozen}"])
        np.testing.assert_allclose(
            new["q.lora_B"].astype(np.float64) @ new["q.lora_A"],
            sum(w * x for w, x in zip(WEIGHTS, local, strict=True)),
            rtol=1e-5,
            atol=1e-6,
        )
        shared = new


@pytest.mark.parametrize("server_round, trained", [(1, "lora_B"), (2, "lora_A"), (3, "lora_B")])
def test_a_client_trains_and_uploads_only_the_factor_of_the_round(server_round, trained):
    method = _method()
    base = load_base_model("minilm", 5, num_hidden_layers=1)
    rng = np.random.default_rng(1)
    shared = {
        f"{m}.lora_{n}": (0.1 * rng.normal(size=shape)).astype(np.float32)
        for m, (d_out, d_in) in base.layer_shapes().items()
        for n, shape in (("A", (RANK, d_in)), ("B", (d_out, RANK)))
    }
    adapter = method.make_adapter(base, RANK, 0.0)
    adapter.server_round = server_round
    method.install(adapter, shared, server_round - 1)
    method.start_round(adapter)
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=0.5)
    ids = torch.randint(len(base.tokenizer), (4, 12), generator=torch.Generator().manual_seed(0))
    adapter.model(input_ids=ids, labels=torch.arange(4) % 5).loss.backward()
    optimizer.step()
    after = adapter.arrays(("lora_A", "lora_B"))
    upload = method.upload(adapter)
    assert set(upload) == {f"{m}.{trained}" for m in adapter.targets}
    for key, value in after.items():
        moved = not np.array_equal(value, shared[key])
        assert moved == key.endswith(trained), key


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"ranks": "8,4"}, "fedalora-hetero"),
        ({"dp-noise-multiplier": 1.0}, "alternates"),
        ({"lora-plus-ratio": 16.0}, "lora-plus-ratio"),
    ],
)
def test_what_rolora_cannot_do_is_refused_before_training(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_config(strategy="rolora", **{"ranks": str(RANK), **overrides})
