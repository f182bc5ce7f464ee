"""The centralised ALoRA reference: one shared B, one private A per client-task."""

import json

import pytest
import torch

from fedalora import fairness
from fedalora.centralised import run_centralised
from fedalora.client import FederatedClient

from .conftest import tiny_config


@pytest.mark.parametrize("ranks", ["4", "8,4,2"])
def test_the_reference_writes_a_run_that_fairness_reads(tmp_path, ranks):
    config = tiny_config(
        strategy="fedalora-hetero", ranks=ranks, num_server_rounds=2, local_steps=2
    )
    run_dir = run_centralised(config, 3, tmp_path / "central")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "config.json").read_text())["strategy"] == "centralised"
    scores = fairness.client_scores(run_dir)
    assert list(scores.index) == [0, 1, 2]
    assert list(scores["rank"]) == [config.run.rank_for(k) for k in range(3)]
    assert fairness.over_rounds(run_dir).index.tolist() == [1, 2]
    assert fairness.communication(run_dir) == {
        "bytes_up_per_client_round": 0.0,
        "bytes_down_per_client_round": 0.0,
    }


@pytest.mark.parametrize("ranks", ["4", "8,4,2"])
def test_b_is_shared_and_a_stays_per_client(ranks):
    config = tiny_config(strategy="fedalora" if ranks == "4" else "fedalora-hetero", ranks=ranks)
    clients = [FederatedClient(config, k, 3, config.run.rank_for(k)) for k in range(3)]
    adapters = [c.build_adapter(_zero(c, config, ranks), None) for c in clients]
    type(adapters[0]).pool_shared_factor(adapters)
    module = adapters[0].targets[0]

    def factors(adapter):
        layer = adapter.layer(module)
        if ranks == "4":
            return layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return layer.A, layer.B0

    assert len({id(factors(a)[1]) for a in adapters}) == 1  # one B for every client
    assert len({id(factors(a)[0]) for a in adapters}) == 3  # an A of its own each
    before = [factors(a)[0].detach().clone() for a in adapters]
    shared_before = factors(adapters[0])[1].detach().clone()
    params = list({id(p): p for a in adapters for p in a.trainable_parameters()}.values())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    from fedalora.data import collate

    batch = collate(
        clients[0].data.train, [0, 1, 2, 3], clients[0].base.tokenizer, torch.device("cpu")
    )
    adapters[0].model(**batch).loss.backward()
    optimizer.step()
    assert not torch.equal(factors(adapters[1])[1], shared_before)  # client 1 sees the new B
    assert torch.equal(factors(adapters[1])[0], before[1])  # but keeps its own A


def _zero(client, config, ranks):
    """The method's initial shared state: B = 0 (equal ranks) or B0 = 0."""
    return config.method.initial_shared(client.base.layer_shapes(), config.run.rank_list)


def test_masa_pools_its_own_banks_with_one_b_and_needs_one_rank():
    from fedalora.centralised import counterpart
    from fedalora.errors import ConfigError

    config = tiny_config(strategy="masa", ranks="4")
    assert counterpart(config, [4, 4, 4]) is config  # MASA's own adapters, not ALoRA's
    clients = [FederatedClient(config, k, 3, 4) for k in range(3)]
    adapters = [c.build_adapter(_zero(c, config, "4"), None) for c in clients]
    type(adapters[0]).pool_shared_factor(adapters)
    module = adapters[0].targets[0]
    assert len({id(a.layer(module).B) for a in adapters}) == 1
    assert len({id(a.layer(module).mix) for a in adapters}) == 3
    assert counterpart(tiny_config(strategy="fedit", ranks="4"), [4]).strategy == "fedalora"
    with pytest.raises(ConfigError, match=r"run-config 'ranks'.*needs one rank"):
        counterpart(tiny_config(strategy="masa", ranks="8,4"), [8, 4])
