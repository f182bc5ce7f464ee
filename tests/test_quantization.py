"""Quantised base models (run-config ``quantization``) through bitsandbytes on CPU: the
frozen layers quantised, the adapters and the new head in full precision and trained,
and the exported adapter exact on the quantised base and loadable on the plain one."""

import copy
import sys

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from torch import nn

from fedalora.adapters import load_peft_adapter
from fedalora.client import FederatedClient
from fedalora.data import collate
from fedalora.errors import ConfigError
from fedalora.instructions import TASKS
from fedalora.methods import Participant
from fedalora.models import load_base_model, require_bitsandbytes

from .conftest import tiny_config
from .test_model_families import BUILT_IN, CLASSES, assert_round_trip

#: The packaged models cut to 2 layers: a classifier on bbc-news, a causal LM on the
#: instruction tasks (one per client).
FAMILIES = {
    "minilm": {},
    "smollm2": {
        "dataset": "instructions",
        "partitioning": "task",
        "max_length": 48,
        "max_new_tokens": 2,
        "test_fraction": 0.02,
        "batch_size": 4,
    },
}


def _client(strategy, model, quantization="4bit"):
    config = tiny_config(
        strategy=strategy,
        ranks="8,4,2",
        model=model,
        quantization=quantization,
        device="cpu",
        **FAMILIES[model],
    )
    clients = len(TASKS) if model == "smollm2" else 3
    return config, FederatedClient(config, 0, clients, 8)


def _batch(client):
    batch = collate(client.data.test, list(range(4)), client.base.tokenizer, torch.device("cpu"))
    batch.pop("labels")
    return batch


@pytest.mark.parametrize("strategy", ["fedalora-hetero", "zeropad"])
def test_the_frozen_layers_are_4bit_and_only_adapters_and_head_train(strategy):
    config, client = _client(strategy, "minilm")
    base = client.base
    assert all(isinstance(base.model.get_submodule(t), bnb.nn.Linear4bit) for t in base.targets)
    assert type(base.model.get_submodule("classifier")) is nn.Linear  # the new head: plain
    plain = load_base_model("minilm", base.model.config.num_labels, num_hidden_layers=2)
    assert base.layer_shapes() == plain.layer_shapes()
    shared = config.method.initial_shared(base.layer_shapes(), config.run.rank_list)
    adapter = client.build_adapter(shared, None)
    trainable = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    adapter_tensors = {id(t) for t in adapter.tensors().values()}
    for name, param in adapter.model.named_parameters():
        if param.requires_grad:
            assert id(param) in adapter_tensors or ".classifier." in f".{name}", name
            assert param.dtype == torch.float32
    assert any("classifier" in n for n in trainable)
    shared_weight = base.model.get_submodule(base.targets[0]).weight
    wrapped = [m for m in adapter.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(m.weight is shared_weight for m in wrapped)  # the worker's one copy
    assert any(m.quant_state is shared_weight.quant_state for m in wrapped)


@pytest.mark.parametrize("model", list(FAMILIES))
@pytest.mark.parametrize("strategy", ["fedalora-hetero", "zeropad"])
def test_a_4bit_client_trains_and_its_export_loads_on_either_base(tmp_path, strategy, model):
    config, client = _client(strategy, model)
    method = config.method
    me = Participant(0, client.rank, client.data.num_train)
    shared = method.initial_shared(client.base.layer_shapes(), config.run.rank_list)
    private = None
    for server_round in (1, 2):  # round 2 trains after round 1's evaluation
        result = client.train(method.download(shared, me), private, server_round, server_round - 1)
        assert np.isfinite(result.metrics["loss"]) and np.isfinite(result.metrics["grad_norm"])
        assert all(np.isfinite(v).all() for v in result.upload.values())
        shared, private = method.aggregate(shared, [result.upload], [me]), result.private
    download = method.download(shared, me)
    client.export(download, private, tmp_path / "adapter", 2, 3)
    ours = client.build_adapter(download, private, 2, 3).model.eval()
    on_quantised = load_peft_adapter(client.base.model, tmp_path / "adapter").eval()
    with torch.no_grad():
        mine, theirs = ours(**_batch(client)).logits, on_quantised(**_batch(client)).logits
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=1e-4)
    labels = client.base.model.config.num_labels if model == "minilm" else 0
    plain = load_base_model(model, labels, num_hidden_layers=2)
    on_plain = load_peft_adapter(plain.model, tmp_path / "adapter").eval()
    lora = {k: v for k, v in on_quantised.state_dict().items() if "lora_" in k}
    assert lora and all(torch.equal(on_plain.state_dict()[k], v) for k, v in lora.items())
    with torch.no_grad():
        assert torch.isfinite(on_plain(**_batch(client)).logits).all()


def test_8bit_runs_on_cpu_and_every_client_shares_the_int8_weights():
    config, client = _client("zeropad", "minilm", "8bit")
    base = client.base
    assert all(isinstance(base.model.get_submodule(t), bnb.nn.Linear8bitLt) for t in base.targets)
    reference = copy.deepcopy(base.model)  # its own int8 weights, before any forward
    shared = config.method.initial_shared(base.layer_shapes(), config.run.rank_list)
    with torch.no_grad():  # B = 0: each fresh adapter computes the base, a later one too
        first = client.build_adapter(shared, None).model.eval()(**_batch(client)).logits
        later = client.build_adapter(shared, None).model.eval()(**_batch(client)).logits
        expected = reference(**_batch(client)).logits
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(later, expected, rtol=0, atol=1e-6)
    me = Participant(0, client.rank, client.data.num_train)
    result = client.train(config.method.download(shared, me), None, 1)
    assert np.isfinite(result.metrics["loss"])
    assert all(np.isfinite(v).all() for v in result.upload.values())


def test_the_configuration_refuses_what_cannot_be_quantised(monkeypatch):
    with pytest.raises(ConfigError, match=r"'quantization': choose one of: none, 8bit, 4bit"):
        tiny_config(quantization="3bit")
    with pytest.raises(ConfigError, match=r"'lora-init': a principal init rewrites the base"):
        tiny_config(strategy="fedalora", ranks="4", lora_init="pissa", quantization="4bit")
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "bitsandbytes", None)  # cannot be imported
        with pytest.raises(ConfigError, match=r"'quantization': '4bit' needs bitsandbytes"):
            tiny_config(quantization="4bit")

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", unsupported)
    with pytest.raises(ConfigError, match=r"cannot quantise to 4bit on cpu \(no kernel"):
        require_bitsandbytes("4bit", torch.device("cpu"))


@pytest.fixture(scope="module", params=["4bit", "8bit"])
def quantised_minilm(request):
    return load_base_model("minilm", CLASSES, num_hidden_layers=1, quantization=request.param)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_method_trains_on_a_quantised_base_and_exports_exactly(
    tmp_path, quantised_minilm, name
):
    assert_round_trip(tmp_path, quantised_minilm, name, "minilm")
