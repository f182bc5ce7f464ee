"""The one Flower strategy on fabricated replies, for every method: only well-formed
updates of known nodes enter the aggregate, weights renormalise over them, too few
replies keep the shared state, and the messages move exactly what each rule says."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.supercore.task_identity import TaskIdentity

from fedalora.aggregation import accumulate_decomposed, weighted_average
from fedalora.methods import registered_methods
from fedalora.outputs import RunRecorder, read_jsonl
from strategies import MethodStrategy, Node
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    UPLOAD_RANK,
    payload_bytes,
    to_numpy,
    to_record,
)

from .comm_formulas import ORACLE, Layer, floats_per_layer
from .conftest import sole, tiny_config

LAYERS = {"l0.q": (4, 6), "l0.v": (4, 6)}
BUILT_IN = list(registered_methods(built_in=True))


def node(node_id: int, partition_id: int, rank: int, num_examples: int) -> Node:
    return Node(partition_id=partition_id, rank=rank, num_examples=num_examples, node_id=node_id)


NODES = [node(101, 0, 3, 10), node(102, 1, 2, 30), node(103, 2, 1, 60)]


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _strategy(name, tmp_path, nodes=NODES, **overrides):
    heterogeneous = registered_methods()[name].heterogeneous
    config = tiny_config(
        strategy=name, ranks="3,2,1" if heterogeneous else "2", min_nodes=2, **overrides
    )
    strategy = MethodStrategy(config, LAYERS, RunRecorder(tmp_path))
    strategy.connect(nodes)
    return strategy


def _update(strategy, client, rng, corrupt=False, server_round=1):
    arrays = {
        k: rng.normal(size=s).astype(np.float32)
        for k, s in strategy.method.upload_shapes(LAYERS, client.rank, server_round).items()
    }
    if corrupt:
        next(iter(arrays.values()))[0, 0] = np.nan
    return arrays


def _reply(message, arrays=None, error=None, num_examples=None):
    """A train reply; its example count is the one its node claimed at discovery."""
    if error:
        return Message(Error(code=1, reason=error), reply_to=message)
    if num_examples is None:
        num_examples = {n.node_id: n.num_examples for n in NODES}[message.metadata.dst_node_id]
    metrics = MetricRecord(
        {"num_examples": num_examples, "loss": 1.0, "accuracy": 0.5, "seconds": 0.1}
    )
    content = RecordDict(
        {sole(message, ARRAYS): to_record(arrays), sole(message, METRICS): metrics}
    )
    return Message(content, reply_to=message)


def _train_messages(strategy, server_round=1):
    return list(strategy.configure_train(server_round, strategy.arrays, ConfigRecord(), None))


def test_every_built_in_method_has_its_oracle_row():
    assert set(BUILT_IN) == set(ORACLE)


def test_connect_refuses_ranks_the_method_cannot_take(tmp_path):
    from fedalora.errors import ConfigError

    config = tiny_config(strategy="fedit", ranks="2")
    with pytest.raises(ConfigError, match=r"'ranks'.*fedit.*\[1, 2, 3\].*fedalora-hetero"):
        MethodStrategy(config, LAYERS).connect(NODES)
    with pytest.raises(ConfigError, match=r"lora-rank of client 0 \(node 101\).*<= 4"):
        MethodStrategy(config, LAYERS).connect([node(101, 0, 5, 10)])


def test_failed_and_corrupt_replies_are_left_out_and_weights_renormalise(tmp_path):
    strategy = _strategy("fedalora-hetero", tmp_path)
    rng = np.random.default_rng(0)
    messages = _train_messages(strategy)
    assert [m.metadata.dst_node_id for m in messages] == [101, 102, 103]
    good = {n.node_id: _update(strategy, n, rng) for n in NODES[:2]}
    replies = [
        _reply(messages[0], good[101], num_examples=10),
        _reply(messages[1], good[102], num_examples=30),
        _reply(messages[2], _update(strategy, NODES[2], rng, corrupt=True)),
    ]
    before = {k: v.copy() for k, v in strategy.shared.items()}
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = accumulate_decomposed(before, [good[101], good[102]], [10, 30])
    assert all(np.allclose(to_numpy(arrays)[k], expected[k]) for k in expected)

    messages = list(strategy.configure_train(2, to_record(before), ConfigRecord(), None))
    error_replies = [
        _reply(messages[0], good[101], num_examples=10),
        _reply(messages[1], error="CUDA out of memory"),
        _reply(messages[2], {"l0.q.B2": np.zeros((4, 1), np.float32)}),
    ]
    assert strategy.aggregate_train(2, error_replies) == (None, None)  # 1 < min-nodes
    assert all(np.array_equal(strategy.shared[k], before[k]) for k in before)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert {r["client"] for r in rows if r["round"] == 2} == {0, 2}  # the failed node has none


def test_the_strategy_sends_the_global_arrays_it_is_given(tmp_path):
    """Flower's contract: configure_train works from the ``arrays`` argument."""
    strategy = _strategy("fedalora", tmp_path, [node(101, 0, 2, 10), node(102, 1, 2, 30)])
    given = {k: np.full_like(v, 0.5) for k, v in strategy.shared.items()}
    for message in strategy.configure_train(1, to_record(given), ConfigRecord(), None):
        sent = to_numpy(message.content[sole(message, ARRAYS)])
        assert all(np.array_equal(sent[k], given[k]) for k in given)


def test_homogeneous_fedalora_averages_b_and_sends_the_same_b(tmp_path):
    nodes = [node(101, 0, 2, 10), node(102, 1, 2, 30)]
    strategy = _strategy("fedalora", tmp_path, nodes)
    assert {k: v.shape for k, v in strategy.shared.items()} == {
        "l0.q.lora_B": (4, 2),
        "l0.v.lora_B": (4, 2),
    }
    rng = np.random.default_rng(1)
    messages = _train_messages(strategy)
    updates = [_update(strategy, n, rng) for n in nodes]
    arrays, _ = strategy.aggregate_train(
        1,
        [
            _reply(m, u, num_examples=n.num_examples)
            for m, u, n in zip(messages, updates, nodes, strict=True)
        ],
    )
    expected = weighted_average(updates, [10, 30])
    assert all(np.allclose(to_numpy(arrays)[k], expected[k]) for k in expected)


def _destinations(messages):
    return [m.metadata.dst_node_id for m in messages]


def test_sampling_is_seeded_and_respects_min_nodes(tmp_path):
    nodes = [node(100 + i, i, 2, 10) for i in range(10)]
    picks = []
    for _ in range(2):
        strategy = _strategy("fedalora-hetero", tmp_path, nodes, fraction_train=0.3)
        picks.append(_destinations(_train_messages(strategy, 4)))
    assert picks[0] == picks[1] and len(picks[0]) == 3
    strategy = _strategy("fedalora-hetero", tmp_path, nodes, fraction_train=0.05)
    assert len(_train_messages(strategy)) == 2  # min-nodes


def test_fraction_evaluate_samples_but_the_last_round_scores_every_node(tmp_path):
    nodes = [node(100 + i, i, 2, 10) for i in range(10)]
    strategy = _strategy(
        "fedalora-hetero", tmp_path, nodes, fraction_evaluate=0.4, num_server_rounds=3
    )

    def evaluate(server_round):
        return _destinations(
            strategy.configure_evaluate(server_round, strategy.arrays, ConfigRecord(), None)
        )

    first = evaluate(1)
    assert first == evaluate(1) and len(first) == 4
    assert len(evaluate(3)) == 10


@pytest.mark.parametrize("name", BUILT_IN)
def test_messages_move_exactly_what_the_rule_says(tmp_path, name):
    heterogeneous = registered_methods()[name].heterogeneous
    nodes = NODES if heterogeneous else [node(101 + i, i, 2, 10 * (i + 1)) for i in range(3)]
    strategy = _strategy(name, tmp_path, nodes)
    ranks, rng = [n.rank for n in nodes], np.random.default_rng(2)
    d_m = strategy.config.options.to_run_config().get("intermediate-rank", 0)

    def expected(direction, client, server_round, first):
        return 4 * sum(
            floats_per_layer(
                name, direction, Layer(client.rank, ranks, d_out, d_in, d_m, first, server_round)
            )
            for d_out, d_in in LAYERS.values()
        )

    arrays = strategy.arrays
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), None))
        for message, client in zip(messages, nodes, strict=True):
            assert payload_bytes(message.content[sole(message, ARRAYS)]) == expected(
                "down", client, server_round, server_round == 1
            )
            assert message.content[CONFIG]["shared-round"] == server_round - 1
        updates = [_update(strategy, n, rng, server_round=server_round) for n in nodes]
        assert [payload_bytes(to_record(u)) for u in updates] == [
            expected("up", n, server_round, False) for n in nodes
        ]
        replies = [
            _reply(m, u, num_examples=n.num_examples)
            for m, u, n in zip(messages, updates, nodes, strict=True)
        ]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert arrays is not None and strategy.shared_round == server_round
        assert {k.rsplit(".", 1)[1] for k in to_numpy(arrays)} == ORACLE[name].shared
        evaluate = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), None))
        for message, client in zip(evaluate, nodes, strict=True):
            assert payload_bytes(message.content[sole(message, ARRAYS)]) == expected(
                "down", client, server_round, False
            )


@pytest.mark.parametrize("name", [n for n in BUILT_IN if registered_methods()[n].heterogeneous])
def test_only_a_method_that_lets_ranks_shrink_accepts_a_pruned_rank(tmp_path, name):
    strategy = _strategy(name, tmp_path)
    shrinks = registered_methods()[name].ranks_can_shrink
    rng = np.random.default_rng(3)
    messages = _train_messages(strategy)
    pruned = node(101, 0, 2, 10)  # node 101 registered rank 3, now uploads rank 2
    updates = [_update(strategy, pruned, rng)] + [_update(strategy, n, rng) for n in NODES[1:]]
    replies = [_reply(m, u) for m, u in zip(messages, updates, strict=True)]
    replies[0].content[sole(messages[0], METRICS)][UPLOAD_RANK] = 2
    strategy.aggregate_train(1, replies)
    assert strategy.clients[0].rank == (2 if shrinks else 3)
    if shrinks:  # a rank may shrink, never grow
        messages = _train_messages(strategy, 2)
        grown = node(103, 2, 2, 60)
        replies = [
            _reply(m, _update(strategy, n, rng))
            for m, n in zip(messages, [pruned, NODES[1], grown], strict=True)
        ]
        replies[2].content[sole(messages[2], METRICS)][UPLOAD_RANK] = 2
        strategy.aggregate_train(2, replies)
        assert strategy.clients[2].rank == 1


def test_flowers_own_start_drives_the_strategy_to_the_same_result(tmp_path):
    """Flower's ``Strategy.start`` and ``run_rounds`` give the same shared state."""
    from strategies import discover_nodes, run_rounds

    from .test_faults import ScriptedGrid, make_strategy

    ours = make_strategy(tmp_path / "ours")
    grid = ScriptedGrid(ours)
    ours.connect(discover_nodes(grid, 2, timeout=5))
    run_rounds(ours, grid)
    flowers = make_strategy(tmp_path / "flower")
    grid = ScriptedGrid(flowers)
    result = flowers.start(grid, flowers.connect(discover_nodes(grid, 2, timeout=5)), num_rounds=2)
    final = to_numpy(result.arrays)
    assert final.keys() == ours.shared.keys()
    assert all(np.array_equal(final[k], ours.shared[k]) for k in final)
    assert set(result.evaluate_metrics_clientapp) == {1, 2}


def test_llama_communication_reproduces_the_papers_ratio():
    """Ranks 64,64,32,32,16,16,8,8, d_m=16, LLaMA-2-7B q/v (32 layers x 2 of 4096 x 4096):
    Fed-ALoRA moves about a quarter of what zero-padding moves (paper: 12.12 M vs 49.28 M
    parameters per client per round), counted from the methods' own arrays."""
    from benchmarks.communication import per_client_floats

    layer = {"layers.0.q_proj": (4096, 4096)}
    rows = per_client_floats(
        ["fedalora-hetero", "zeropad"], layer, [64, 64, 32, 32, 16, 16, 8, 8], 16
    )
    rows += per_client_floats(["fedalora", "fedit"], layer, [8] * 8, 16)
    total = {r["strategy"]: 64 * (r["up"] + r["down"]) / 1e6 for r in rows}
    assert abs(total["zeropad"] - 49.28) < 0.01 and abs(total["fedalora-hetero"] - 12.12) < 0.05
    assert 0.23 < total["fedalora-hetero"] / total["zeropad"] < 0.26
    # Homogeneous r=8 (paper: FedIT 8.39 M, Fed-ALoRA 4.19 M).
    assert abs(total["fedit"] - 8.39) < 0.01 and abs(total["fedalora"] - 4.19) < 0.01
