"""SDFLoRA (Shen, Lu, Wan and Chen, arXiv:2601.11219): a global module of rank r_g that
every client shares and averages, beside a local module of the client's remaining
rank that never leaves it; under DP only the global module is clipped and noised."""

import numpy as np
import pytest
import torch

from fedalora.errors import ConfigError
from fedalora.methods import Participant
from fedalora.models import load_base_model

from .conftest import tiny_config

R_G = 2


def _method(ranks="6,4,3", **overrides):
    return tiny_config(strategy="sdflora", ranks=ranks, **{"global-rank": R_G, **overrides}).method


@pytest.fixture(scope="module")
def base():
    return load_base_model("minilm", 5, num_hidden_layers=1)


def _trained(method, base, rank, shared, seed):
    torch.manual_seed(seed)
    adapter = method.make_adapter(base, rank, 0.0)
    method.install(adapter, shared, 1)
    method.start_round(adapter)
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=0.5)
    ids = torch.randint(len(base.tokenizer), (4, 12), generator=torch.Generator().manual_seed(seed))
    adapter.model(input_ids=ids, labels=torch.arange(4) % 5).loss.backward()
    optimizer.step()
    return adapter


def test_clients_of_any_rank_share_and_average_only_their_global_module(base):
    method = _method()
    layers = base.layer_shapes()
    ranks, counts = [6, 4, 3], [10, 30, 60]
    shared = method.initial_shared(layers, ranks)
    adapters = [_trained(method, base, r, shared, seed) for seed, r in enumerate(ranks)]
    uploads = [method.upload(a) for a in adapters]
    for adapter, upload in zip(adapters, uploads, strict=True):
        factors = adapter.arrays(("lora_A", "lora_B"))
        for m in adapter.targets:  # the first r_g rank slots go up, and nothing else
            assert set(upload) == {f"{t}.global_{n}" for t in adapter.targets for n in "AB"}
            np.testing.assert_array_equal(upload[f"{m}.global_A"], factors[f"{m}.lora_A"][:R_G])
            np.testing.assert_array_equal(upload[f"{m}.global_B"], factors[f"{m}.lora_B"][:, :R_G])
    clients = [Participant(i, r, n) for i, (r, n) in enumerate(zip(ranks, counts, strict=True))]
    new = method.aggregate(shared, uploads, clients)
    weights = np.array(counts) / 100
    for key in new:
        mean = sum(w * u[key].astype(np.float64) for w, u in zip(weights, uploads, strict=True))
        np.testing.assert_allclose(new[key], mean, rtol=1e-5, atol=1e-7)

    # next round: the global slots are the average, the local ones the client's own
    adapter = adapters[0]
    private = adapter.private_state(method.keeps)
    again = method.make_adapter(base, ranks[0], 0.0)
    again.load_private(private, method.keeps)
    method.install(again, method.download(new, clients[0]), 1)
    before, after = adapter.arrays(("lora_A", "lora_B")), again.arrays(("lora_A", "lora_B"))
    for m in again.targets:
        np.testing.assert_array_equal(after[f"{m}.lora_A"][:R_G], new[f"{m}.global_A"])
        np.testing.assert_array_equal(after[f"{m}.lora_A"][R_G:], before[f"{m}.lora_A"][R_G:])
        np.testing.assert_array_equal(after[f"{m}.lora_B"][:, :R_G], new[f"{m}.global_B"])
        np.testing.assert_array_equal(after[f"{m}.lora_B"][:, R_G:], before[f"{m}.lora_B"][:, R_G:])


def test_under_dp_only_the_global_module_is_clipped_and_noised(base):
    method = _method(**{"dp-noise-multiplier": 1.0, "dp-clip": 0.1})
    assert method.dp_refusal() is None
    layers = base.layer_shapes()
    assert method.delta_shapes(layers, 6) == {
        **{f"{m}.global_A": (R_G, d_in) for m, (_, d_in) in layers.items()},
        **{f"{m}.global_B": (d_out, R_G) for m, (d_out, _) in layers.items()},
    }


def test_a_rank_below_the_global_rank_is_refused_before_training():
    assert _method().initial_shared({"q": (8, 8)}, [6, 2])  # rank r_g: no local module
    with pytest.raises(ConfigError, match="global-rank=2"):
        _method().initial_shared({"q": (8, 8)}, [6, 1])
    with pytest.raises(ConfigError, match="global-rank"):
        _method(**{"global-rank": 0})
