"""Every method's client side, driven by the method's own server side: what goes up,
what stays, and each method's client hooks (frozen A, truncation, merging, pruning)."""

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity

from clients import client_app
from fedalora.client import FederatedClient
from fedalora.methods import Participant, registered_methods
from fedalora.methods.hetlora import RANK, TAIL_NORM
from fedalora.methods.lora_factors import seeded_lora_a
from strategies.protocol import ARRAYS, METRICS, UPLOAD_RANK, keyed, to_numpy

from .comm_formulas import ORACLE
from .conftest import tiny_config
from .test_client_app import _client, _context, _message, _private_arrays

HETERO_RANKS = [8, 4, 2]
BUILT_IN = list(registered_methods(built_in=True))


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 100


class Server:
    """The method's server side for three clients (node 0 is the one under test)."""

    def __init__(self, config, layers, ranks):
        self.method = config.method
        self.clients = [Participant(i, r, 100) for i, r in enumerate(ranks)]
        self.shared = self.method.initial_shared(layers, ranks)
        self.shared_round = 0

    def download(self, client=0):
        return self.method.download(self.shared, self.clients[client])

    def aggregate(self, upload, server_round):  # a one-client round
        self.shared = self.method.aggregate(self.shared, [upload], self.clients[:1])
        self.shared_round = server_round


def _setup(name, **overrides):
    """Config, node 0's context and client, and the method's server side."""
    ranks = HETERO_RANKS if registered_methods()[name].heterogeneous else [4, 4, 4]
    config = tiny_config(strategy=name, ranks=",".join(map(str, ranks)), **overrides)
    context = _context(config)
    client = _client(context)
    return config, context, client, Server(config, client.base.layer_shapes(), ranks)


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_method_moves_only_what_its_rule_shares(name):
    config, context, client, server = _setup(name)
    replies = []
    for server_round in (1, 2):
        rounds = {"server-round": server_round, "shared-round": server.shared_round}
        reply = client_app.train(_message(server.download(), **rounds), context)
        upload = to_numpy(reply.content[keyed(ARRAYS, 0)])
        layers = client.base.layer_shapes()
        assert {k: v.shape for k, v in upload.items()} == config.method.upload_shapes(
            layers, client.rank, server_round
        )
        assert reply.content[keyed(METRICS, 0)][UPLOAD_RANK] == client.rank
        server.aggregate(upload, server_round)
        replies.append(reply)
        replies.append(
            client_app.evaluate(
                _message(
                    server.download(),
                    MessageType.EVALUATE,
                    **{"run-name": "t"},
                    **{**rounds, "shared-round": server_round},
                ),
                context,
            )
        )
    private = {
        k: v
        for k, v in _private_arrays(context).items()
        if k.rsplit(".", 1)[1] in ORACLE[name].private
    }
    assert bool(private) == bool(ORACLE[name].private)
    for reply in replies:
        for record in reply.content.array_records.values():
            for key, array in to_numpy(record).items():
                assert key not in private
                assert not any(
                    array.shape == secret.shape and np.allclose(array, secret)
                    for secret in private.values()
                )


def test_ffa_lora_keeps_a_frozen_at_the_shared_seeded_init():
    config, _, client, server = _setup("ffa-lora")
    adapter = client.build_adapter(server.download(), None)
    tensors = adapter.tensors()
    before = {m: tensors[f"{m}.lora_A"].detach().clone() for m in adapter.targets}
    for m, a in before.items():
        np.testing.assert_array_equal(
            a.numpy(), seeded_lora_a(config.run.seed, m, client.rank, a.shape[1])
        )
        assert not tensors[f"{m}.lora_A"].requires_grad
    private = client.train(server.download(), None, 1).private
    after = client.build_adapter(server.download(), private).tensors()
    assert all(torch.equal(before[m], after[f"{m}.lora_A"]) for m in before)


def test_zero_padding_clients_take_their_first_rows_and_columns():
    _, _, client, server = _setup("zeropad")
    padded = server.download()
    assert next(iter(padded.values())).shape[0] == max(HETERO_RANKS)  # the server pads
    tensors = client.build_adapter(padded, None).tensors()
    for m in client.base.targets:
        np.testing.assert_array_equal(
            tensors[f"{m}.lora_A"].detach().numpy(), padded[f"{m}.lora_A"][: client.rank]
        )
        np.testing.assert_array_equal(
            tensors[f"{m}.lora_B"].detach().numpy(), padded[f"{m}.lora_B"][:, : client.rank]
        )


def test_flora_merges_each_round_once_and_refuses_a_gap():
    _, _, client, server = _setup("flora")
    base = {k: v.clone() for k, v in client.base.model.state_dict().items()}
    upload = client.train(server.download(), None, 1).upload
    server.aggregate(upload, 1)
    stack = server.download()
    _, private = client.evaluate(stack, None, shared_round=1)  # merges round 1
    private = client.train(stack, private, 2, shared_round=1).private  # already merged
    module = client.base.targets[0]
    expected = stack[f"{module}.stack_B"] @ stack[f"{module}.stack_A"]
    np.testing.assert_allclose(
        private[f"state.merged.{module}"].numpy(), expected, rtol=1e-5, atol=1e-6
    )
    assert int(private["state.merged-round"]) == 1
    with pytest.raises(ValueError, match="cannot skip a merge"):
        client.train(stack, private, 4, shared_round=3)
    adapter = client.build_adapter(stack, private, shared_round=1)
    merged = base[f"{module}.weight"] + private[f"state.merged.{module}"]
    x = torch.randn(3, merged.shape[1])
    torch.testing.assert_close(  # the frozen layer computes (W0 + merged) x + b
        adapter.layer(module).base_layer(x),
        torch.nn.functional.linear(x, merged, base[f"{module}.bias"]),
    )
    after = client.base.model.state_dict()  # the worker's shared W0 is never merged into
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_hetlora_prunes_its_rank_when_the_tail_fades():
    config = tiny_config(strategy="hetlora", ranks="8,4,2", rank_decay=0.5, rank_penalty=0.1)
    client = FederatedClient(config, 0, 3, 8)
    download = Server(config, client.base.layer_shapes(), HETERO_RANKS).download()
    upload, private, metrics, _ = client.train(download, None, 1)
    tail, rank = f"state.{TAIL_NORM}", f"state.{RANK}"
    assert metrics["rank"] == 8 and int(private[rank]) == 8 and float(private[tail]) > 0
    private[tail] = torch.tensor(1e9)  # last round's tail was larger: it fades
    upload, private, metrics, _ = client.train(download, private, 2, shared_round=0)
    assert metrics["rank"] == 4 and int(private[rank]) == 4 and tail not in private
    assert all(v.shape[0 if k.endswith("lora_A") else 1] == 4 for k, v in upload.items())
    assert client.build_adapter(download, private).rank == 4  # trains at rank 4 from now on


def test_persist_private_false_restarts_lora_factors_but_keeps_the_head():
    config = tiny_config(strategy="local", ranks="8,4,2", persist_private=False)
    client = FederatedClient(config, 0, 3, 8)
    trained = client.train({}, None, 1).private
    fresh = client.build_adapter({}, None).private_state(client.method.keeps)
    restarted = client.build_adapter({}, trained).private_state(client.method.keeps)
    for key, value in restarted.items():
        expected = trained[key] if key.startswith("head.") else fresh[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained if ".lora_B" in k)


@pytest.mark.parametrize(
    "scaling, expected", [("constant", 4.0), ("alpha-over-rank", 0.5), ("rslora", 4.0 / np.sqrt(8))]
)
def test_peft_applies_the_same_scale_as_the_servers_reconstruction(scaling, expected):
    config, _, client, server = _setup("flexlora", scaling=scaling, lora_alpha=4.0)
    adapter = client.build_adapter(server.download(), None)
    assert client.rank == 8 and config.lora.scaling.scale(8) == pytest.approx(expected)
    for module in adapter.targets:
        assert adapter.layer(module).scaling["default"] == pytest.approx(expected)
