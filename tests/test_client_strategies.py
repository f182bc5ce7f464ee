"""Every strategy's client side, driven by the strategy's own server-side messages:
what goes up, what stays, and the special cases (frozen A, merging, rank pruning)."""

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity

from clients import client_app
from fedalora.client import RANK, TAIL_NORM, FederatedClient
from fedalora.sharing import SHARING, seeded_lora_a
from strategies import STRATEGIES
from strategies.common import ARRAYS, METRICS, NodeInfo, to_numpy

from .conftest import tiny_config
from .test_client_app import _context, _message, _private_arrays

HETERO_RANKS = [8, 4, 2]


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 100


def _setup(name, **overrides):
    """Config, a server-side strategy that knows three nodes, and node 0's context."""
    ranks = HETERO_RANKS if SHARING[name].heterogeneous else [4, 4, 4]
    config = tiny_config(strategy=name, ranks=",".join(map(str, ranks)), **overrides)
    context = _context(config)
    client = client_app._client(context)
    strategy = STRATEGIES[name](config, client.base.layer_shapes())
    strategy.nodes = {100 + i: NodeInfo(100 + i, i, r, 100) for i, r in enumerate(ranks)}
    strategy.shared = strategy.initial_shared()
    return config, context, client, strategy


def _private_factors(name, private):
    """The private arrays that must never appear in a message."""
    if SHARING[name].adapter == "decomposed":
        return {k: v for k, v in private.items() if k.endswith((".A", ".M"))}
    return {k: v for k, v in private.items()
            if any(k.endswith(f".lora_{f}") for f in SHARING[name].private)}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_each_strategy_moves_only_what_its_rule_shares(name):
    config, context, client, strategy = _setup(name)
    node = strategy.nodes[100]
    replies = []
    for server_round in (1, 2):
        download = strategy.download(node)
        shared_round = {"server-round": server_round, "shared-round": strategy.shared_round}
        reply = client_app.train(_message(download, **shared_round), context)
        upload = to_numpy(reply.content[ARRAYS])
        assert {k: v.shape for k, v in upload.items()} == strategy.upload_shapes(node.rank)
        assert reply.content[METRICS]["rank"] == node.rank
        strategy.shared = strategy.aggregate([upload], [node])  # a one-client round trip
        strategy.shared_round = server_round
        replies.append(reply)
        replies.append(client_app.evaluate(
            _message(strategy.download(node), MessageType.EVALUATE, **{"run-name": "t"},
                     **{**shared_round, "shared-round": server_round}), context))
    private = _private_factors(name, _private_arrays(context))
    assert bool(private) == (SHARING[name].adapter == "decomposed" or
                             bool(SHARING[name].private))
    for reply in replies:
        for record in reply.content.array_records.values():
            for key, array in to_numpy(record).items():
                assert key not in private
                assert not any(array.shape == secret.shape and np.allclose(array, secret)
                               for secret in private.values())


def test_ffa_lora_keeps_a_frozen_at_the_shared_seeded_init():
    config, context, client, strategy = _setup("ffa-lora")
    adapter = client.build_adapter(strategy.download(strategy.nodes[100]), None)
    before = {m: adapter._factor(m, "A").detach().clone() for m in adapter.targets}
    for m, a in before.items():
        expected = seeded_lora_a(config.seed, m, client.rank, a.shape[1])
        np.testing.assert_array_equal(a.numpy(), expected)
        assert not adapter._factor(m, "A").requires_grad
    _, private, _ = client.train(strategy.download(strategy.nodes[100]), None, 1)
    after = client.build_adapter(strategy.download(strategy.nodes[100]), private)
    assert all(torch.equal(before[m], after._factor(m, "A")) for m in before)


def test_zero_padding_clients_take_their_first_rows_and_columns():
    _, _, client, strategy = _setup("zeropad")
    padded = strategy.download(strategy.nodes[100])
    rank = client.rank
    adapter = client.build_adapter(padded, None)
    for m in adapter.targets:
        np.testing.assert_array_equal(adapter._factor(m, "A").detach().numpy(),
                                      padded[f"{m}.lora_A"][:rank])


def test_flora_merges_each_round_once_and_refuses_a_gap():
    _, context, client, strategy = _setup("flora")
    base = {k: v.clone() for k, v in client.base.model.state_dict().items()}
    node = strategy.nodes[100]
    upload, _, _ = client.train(strategy.download(node), None, 1)
    strategy.shared = strategy.aggregate([upload], [node])
    stack = strategy.download(node)
    metrics, private = client.evaluate(stack, None, shared_round=1)  # merges round 1
    _, private, _ = client.train(stack, private, 2, shared_round=1)  # already merged
    module = client.base.targets[0]
    expected = stack[f"{module}.stack_B"] @ stack[f"{module}.stack_A"]
    np.testing.assert_allclose(private[f"merged.{module}"].numpy(), expected, rtol=1e-5,
                               atol=1e-6)
    assert int(private["state.merged-round"]) == 1
    with pytest.raises(ValueError, match="cannot skip a merge"):
        client.train(stack, private, 4, shared_round=3)
    merged = client.build_adapter(stack, private, shared_round=1)._lora(module).base_layer.weight
    torch.testing.assert_close(merged, base[f"{module}.weight"] + private[f"merged.{module}"])
    after = client.base.model.state_dict()  # the worker's shared W0 is never merged into
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_hetlora_prunes_its_rank_when_the_tail_fades():
    config = tiny_config(strategy="hetlora", ranks="8,4,2", rank_decay=0.5, rank_penalty=0.1)
    client = FederatedClient(config, 0, 3, 8)
    _, _, _, strategy = _setup("hetlora")
    download = strategy.download(strategy.nodes[100])
    upload, private, metrics = client.train(download, None, 1)
    assert metrics["rank"] == 8 and int(private[RANK]) == 8 and float(private[TAIL_NORM]) > 0
    private[TAIL_NORM] = torch.tensor(1e9)  # last round's tail was larger: it fades
    upload, private, metrics = client.train(download, private, 2, shared_round=0)
    assert metrics["rank"] == 4 and int(private[RANK]) == 4
    assert all(v.shape[0 if k.endswith("lora_A") else 1] == 4 for k, v in upload.items())
    assert client.build_adapter(download, private).rank == 4  # trains at rank 4 from now on


def test_persist_private_false_restarts_lora_factors_but_keeps_the_head():
    config = tiny_config(strategy="local", ranks="8,4,2", persist_private=False)
    client = FederatedClient(config, 0, 3, 8)
    _, trained, _ = client.train({}, None, 1)
    fresh = client.build_adapter({}, None).private_state()
    restarted = client.build_adapter({}, trained).private_state()
    for key, value in restarted.items():
        expected = trained[key] if key.startswith("head.") else fresh[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained if ".lora_B" in k)


@pytest.mark.parametrize("scaling, expected", [
    ("constant", 4.0), ("alpha-over-rank", 0.5), ("rslora", 4.0 / np.sqrt(8))])
def test_peft_applies_the_same_scale_as_the_servers_reconstruction(scaling, expected):
    config, _, client, strategy = _setup("flexlora", scaling=scaling, lora_alpha=4.0)
    adapter = client.build_adapter(strategy.download(strategy.nodes[100]), None)
    assert client.rank == 8 and config.scale(8) == pytest.approx(expected)
    for module in adapter.targets:
        layer = adapter.inner_model.get_submodule(module)
        assert layer.scaling["default"] == pytest.approx(config.scale(8))
