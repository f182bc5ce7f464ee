"""HetLoRA's rank self-pruning keeps the client's update continuous across the cut
for every LoRA scaling rule: the rank-k model right after the cut, at scale s(k),
computes s(r) B[:, :k] A[:k], the kept components as they were at rank r."""

import math

import numpy as np
import pytest
import torch

from fedalora.adapters import LoRAAdapter
from fedalora.aggregation import product_norm
from fedalora.client import FederatedClient
from fedalora.methods import Participant
from fedalora.methods.hetlora import TAIL_NORM

from .conftest import tiny_config

RANK, KEPT, ALPHA = 8, 4, 4.0


@pytest.mark.parametrize(
    "scaling, jump",  # s(k) / s(r): what the cut multiplied the kept update by unfixed
    [("constant", 1.0), ("alpha-over-rank", 2.0), ("rslora", math.sqrt(2.0))],
)
def test_the_model_after_a_rank_cut_computes_the_kept_update_at_the_old_scale(
    scaling: str, jump: float
) -> None:
    config = tiny_config(
        strategy="hetlora", ranks="8,4,2", rank_decay=0.5, scaling=scaling, lora_alpha=ALPHA
    )
    method, lora = config.method, config.lora.scaling
    assert lora.scale(KEPT) / lora.scale(RANK) == pytest.approx(jump)
    client = FederatedClient(config, 0, 3, RANK)
    layers = client.base.layer_shapes()
    shared = method.initial_shared(layers, [RANK, 4, 2])

    adapter = client.build_adapter(shared, None)
    assert isinstance(adapter, LoRAAdapter)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: random A and B
        for tensor in adapter.tensors().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    before = {  # s(r) B[:, :k] A[:k] per layer, in float64
        m: (
            adapter.scale
            * adapter.layer(m).lora_B["default"].weight[:, :KEPT].detach().double()
            @ adapter.layer(m).lora_A["default"].weight[:KEPT].detach().double()
        )
        for m in adapter.targets
    }
    adapter.state[TAIL_NORM] = torch.tensor(1e9)  # last round's tail was larger: it fades
    upload = method.upload(adapter)
    private = adapter.private_state(method.keeps)
    reported = method.client_rank(RANK, adapter.state)
    assert reported == KEPT

    # the server weighs the upload at the scale of the rank the client reports ...
    norms = {
        m: product_norm(upload[f"{m}.lora_A"], upload[f"{m}.lora_B"], lora.scale(KEPT))
        for m in before
    }
    for m, delta in before.items():
        assert norms[m] == pytest.approx(float(np.linalg.norm(delta.numpy())), rel=1e-5)
    # ... and in a one-client round broadcasts pad(upload), which the client installs at k
    shared = method.aggregate(shared, [upload], [Participant(0, reported, 100)])
    after = client.build_adapter(shared, private, shared_round=1)
    assert isinstance(after, LoRAAdapter)
    assert after.rank == KEPT and after.scale == pytest.approx(lora.scale(KEPT))
    after.model.eval()  # no dropout
    for m, delta in before.items():
        layer = after.layer(m)
        assert layer.scaling["default"] == pytest.approx(lora.scale(KEPT))  # PEFT's own
        product = (
            after.scale
            * layer.lora_B["default"].weight.detach().double()
            @ layer.lora_A["default"].weight.detach().double()
        )
        ratio = float(np.linalg.norm(product.numpy()) / np.linalg.norm(delta.numpy()))
        assert ratio == pytest.approx(1.0, rel=1e-5)  # unfixed: s(k) / s(r) = jump
        np.testing.assert_allclose(product.numpy(), delta.numpy(), rtol=1e-5, atol=1e-5)
        x = torch.randn(3, delta.shape[1], generator=generator)
        with torch.no_grad():  # the layer's forward pass adds exactly the kept update
            added = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(added.double(), x.double() @ delta.T, rtol=1e-4, atol=1e-4)
        a, b = after.peft_factors()[m]  # the exported PEFT factors (A, s B) alike
        np.testing.assert_allclose(
            (b.double() @ a.double()).numpy(), delta.numpy(), rtol=1e-5, atol=1e-5
        )
