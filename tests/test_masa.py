"""MASA: one expert bank per input size serves every layer, is stored once, never leaves
the client, and each layer's effective A is its softmax mix of the experts."""

import torch

from fedalora.client import FederatedClient

from .conftest import tiny_config


def test_one_bank_serves_every_layer_and_each_layer_mixes_it():
    config = tiny_config(strategy="masa", ranks="8,4,2", masa_experts=3)
    client = FederatedClient(config, 0, 3, 8)
    shared = config.method.initial_shared(client.base.layer_shapes(), [8, 4, 2])
    adapter = client.build_adapter(client.method.download(shared, _me(client)), None)
    layers = [adapter.layer(m) for m in adapter.targets]
    assert len({id(layer.bank) for layer in layers}) == 1  # MiniLM: q and v are 384 wide
    assert layers[0].bank.shape == (3, 8, 384)
    with torch.no_grad():
        layers[0].mix.copy_(torch.tensor([0.0, 1.0, -1.0]))
    weights = torch.softmax(torch.tensor([0.0, 1.0, -1.0]), dim=0)
    expected = sum(w * a for w, a in zip(weights, layers[0].bank.detach(), strict=True))
    torch.testing.assert_close(layers[0].mixed_a().detach(), expected)
    private = adapter.private_state(config.method.keeps)
    assert sum(k.endswith(".bank") for k in private) == 1  # stored once
    assert sum(k.endswith(".mix") for k in private) == len(adapter.targets)
    trained = client.train(client.method.download(shared, _me(client)), None, 1)
    assert set(trained.upload) == {f"{m}.lora_B" for m in adapter.targets}
    rebuilt = client.build_adapter(client.method.download(shared, _me(client)), trained.private)
    bank = next(v for k, v in trained.private.items() if k.endswith(".bank"))
    assert all(torch.equal(rebuilt.layer(m).bank.detach(), bank) for m in rebuilt.targets)


def _me(client):
    from fedalora.methods import Participant

    return Participant(client.partition_id, client.rank, client.data.num_train)
