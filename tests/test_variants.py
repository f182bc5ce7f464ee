"""LoRA variants through PEFT's own code: refused where a method cannot take them, the
client's forward equal to PEFT's layer, and the federation's handling of each."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedalora.adapters import load_peft_adapter
from fedalora.client import FederatedClient
from fedalora.data import collate
from fedalora.errors import ConfigError
from fedalora.methods import Participant

from .conftest import tiny_config


def _client(strategy="fedalora", ranks="4", **variants):
    config = tiny_config(strategy=strategy, ranks=ranks, **variants)
    client = FederatedClient(config, 0, 3, config.run.rank_for(0))
    layers = client.base.layer_shapes()
    shared = config.method.initial_shared(layers, config.run.rank_list)
    me = Participant(0, client.rank, client.data.num_train)
    return config, client, shared, me


@pytest.mark.parametrize(
    "values, key, able",
    [
        ({"strategy": "fedalora-hetero", "dora": True}, "dora", "fedalora, fedit"),
        ({"strategy": "zeropad", "ranks": "8,4", "lora-init": "pissa"}, "lora-init", "fedalora"),
        ({"strategy": "ffa-lora", "lora-plus-ratio": 16.0}, "lora-plus-ratio", "flexlora"),
    ],
)
def test_a_method_refuses_the_variants_it_cannot_take_naming_those_that_can(values, key, able):
    with pytest.raises(ConfigError) as info:
        tiny_config(**{k.replace("-", "_"): v for k, v in values.items()})
    assert info.value.key == key and "does not take" in str(info.value) and able in str(info.value)


def _batch(client):
    return collate(client.data.test, list(range(4)), client.base.tokenizer, torch.device("cpu"))


@pytest.mark.parametrize(
    "variant", [{"dora": True}, {"lora_init": "pissa"}, {"lora_init": "olora"}]
)
def test_the_client_forward_is_peft_s_own_layer(variant):
    """The same weights in a model PEFT builds itself give the same outputs."""
    config, client, shared, me = _client(**variant)
    trained = client.train(config.method.download(shared, me), None, 1)
    ours = client.build_adapter(
        config.method.aggregate(shared, [trained.upload], [me]), trained.private, 1, 2
    )
    peft_model = get_peft_model(
        copy.deepcopy(client.base.model),
        LoraConfig(
            r=4,
            target_modules=client.base.targets,
            lora_dropout=0.0,
            use_dora=config.lora.variants.dora,
            init_lora_weights=True,
            modules_to_save=client.base.head_modules,
            **config.lora.scaling.peft_fields(4),
        ),
    )
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for m in client.base.targets:
            theirs, mine = inner.get_submodule(m), ours.layer(m)
            theirs.base_layer.weight.copy_(mine.base_layer.weight)  # a principal init's residual
            for name in (
                "lora_A",
                "lora_B",
                *(("lora_magnitude_vector",) if config.lora.variants.dora else ()),
            ):
                getattr(theirs, name)["default"].weight.copy_(getattr(mine, name)["default"].weight)
        for name in client.base.head_modules:
            head = dict(ours.inner_model.get_submodule(name).named_parameters())
            for pname, param in (
                inner.get_submodule(name).modules_to_save["default"].named_parameters()
            ):
                param.copy_(head[pname])
    ours.model.eval()
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(**_batch(client)).logits, ours.model(**_batch(client)).logits
        )


def test_dora_s_magnitude_is_shared_or_kept_as_asked():
    for placement, shared_keys in (("private", False), ("shared", True)):
        config, client, shared, me = _client(dora=True, dora_magnitude=placement)
        trained = client.train(config.method.download(shared, me), None, 1)
        assert any(k.endswith("lora_magnitude") for k in trained.upload) == shared_keys
        assert any(k.endswith("lora_magnitude") for k in trained.private) != shared_keys
    # shared: every client starts from its own derived magnitude, then the average
    magnitude = next(v for k, v in trained.upload.items() if k.endswith("lora_magnitude"))
    assert magnitude.min() > 1.0  # row norms of W, not the server's placeholder of ones


def test_lora_plus_gives_b_its_ratio_of_the_learning_rate_and_lora_fa_freezes_a():
    config, client, shared, _ = _client(lora_plus_ratio=16.0)
    adapter = client.build_adapter(shared, None)
    optimizer, _ = adapter.optimiser(config.recipe, 3)
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    tensors = adapter.tensors()
    for m in client.base.targets:
        assert rates[id(tensors[f"{m}.lora_B"])] == pytest.approx(
            16 * rates[id(tensors[f"{m}.lora_A"])]
        )
    config, client, shared, me = _client(lora_fa=True)
    adapter = client.build_adapter(shared, None)
    before = {k: v.detach().clone() for k, v in adapter.tensors().items() if k.endswith("lora_A")}
    assert not any(v.requires_grad for k, v in adapter.tensors().items() if k.endswith("lora_A"))
    trained = client.train(config.method.download(shared, me), None, 1)
    after = client.build_adapter(shared, trained.private).tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)  # A_0, frozen


def test_a_principal_init_exports_exactly_and_leaves_the_shared_base_alone(tmp_path):
    config, client, shared, me = _client(lora_init="pissa")
    base = {k: v.clone() for k, v in client.base.model.state_dict().items()}
    trained = client.train(config.method.download(shared, me), None, 1)
    after = client.base.model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)  # the worker's W0 untouched
    _assert_export_reproduces(config, client, shared, me, trained, tmp_path)


@pytest.mark.parametrize(
    "variant",
    [{"dora": True, "dora_magnitude": "shared"}, {"lora_plus_ratio": 16.0}, {"lora_fa": True}],
)
def test_the_exported_adapter_reproduces_the_client_with_each_variant(tmp_path, variant):
    config, client, shared, me = _client(**variant)
    trained = client.train(config.method.download(shared, me), None, 1)
    _assert_export_reproduces(config, client, shared, me, trained, tmp_path)


def _assert_export_reproduces(config, client, shared, me, trained, tmp_path):
    """The adapter exported after one aggregation gives the client's own logits."""
    aggregate = config.method.aggregate(shared, [trained.upload], [me])
    client.export(aggregate, trained.private, tmp_path / "adapter", 1, 2)
    exported = load_peft_adapter(client.base.model, tmp_path / "adapter").eval()
    ours = client.build_adapter(aggregate, trained.private, 1, 2).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            exported(**_batch(client)).logits, ours(**_batch(client)).logits, atol=1e-4, rtol=1e-4
        )
