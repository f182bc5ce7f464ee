"""Strategies on fabricated replies: only well-formed updates of known nodes enter the
aggregate, weights renormalise over them, and too few replies keep the shared state."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.supercore.task_identity import TaskIdentity

from fedalora.aggregation import accumulate_decomposed, weighted_average
from fedalora.outputs import RunRecorder, read_jsonl
from strategies import STRATEGIES
from strategies.common import ARRAYS, METRICS, NodeInfo, to_numpy, to_record

from .conftest import tiny_config

LAYERS = {"l0.q": (4, 6), "l0.v": (4, 6)}
NODES = [NodeInfo(101, 0, 3, 10), NodeInfo(102, 1, 2, 30), NodeInfo(103, 2, 1, 60)]


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _strategy(name, tmp_path, nodes=NODES, **overrides):
    config = tiny_config(strategy=name, ranks="3,2,1" if name == "fedalora-hetero" else "2",
                         min_nodes=2, **overrides)
    strategy = STRATEGIES[name](config, LAYERS, RunRecorder(tmp_path))
    strategy.nodes = {n.node_id: n for n in nodes}
    strategy.shared = strategy.initial_shared()
    return strategy


def _update(strategy, node, rng, corrupt=False):
    arrays = {k: rng.normal(size=s).astype(np.float32)
              for k, s in strategy.upload_shapes(node.rank).items()}
    if corrupt:
        next(iter(arrays.values()))[0, 0] = np.nan
    return arrays


def _reply(message, arrays=None, error=None, num_examples=1):
    if error:
        return Message(Error(code=1, reason=error), reply_to=message)
    metrics = MetricRecord({"num-examples": num_examples, "loss": 1.0, "accuracy": 0.5,
                            "seconds": 0.1})
    return Message(RecordDict({ARRAYS: to_record(arrays), METRICS: metrics}), reply_to=message)


def test_failed_and_corrupt_replies_are_left_out_and_weights_renormalise(tmp_path):
    strategy = _strategy("fedalora-hetero", tmp_path)
    rng = np.random.default_rng(0)
    messages = list(strategy.configure_train(1, to_record(strategy.shared), ConfigRecord(), None))
    assert [m.metadata.dst_node_id for m in messages] == [101, 102, 103]
    good = {n.node_id: _update(strategy, n, rng) for n in NODES[:2]}
    replies = [_reply(messages[0], good[101], num_examples=10),
               _reply(messages[1], good[102], num_examples=30),
               _reply(messages[2], _update(strategy, NODES[2], rng, corrupt=True))]
    before = {k: v.copy() for k, v in strategy.shared.items()}
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = accumulate_decomposed(before, [good[101], good[102]], [10, 30])
    assert all(np.allclose(to_numpy(arrays)[k], expected[k]) for k in expected)

    error_replies = [_reply(messages[0], good[101], num_examples=10),
                     _reply(messages[1], error="CUDA out of memory"),
                     _reply(messages[2], {"l0.q.B2": np.zeros((4, 1), np.float32)})]
    strategy.shared = before
    assert strategy.aggregate_train(2, error_replies) == (None, None)  # 1 < min-nodes
    assert all(np.array_equal(strategy.shared[k], before[k]) for k in before)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert {r["client"] for r in rows if r["round"] == 2} == {0, 2}  # the failed node has none


def test_homogeneous_strategy_averages_b_and_sends_the_same_b(tmp_path):
    nodes = [NodeInfo(101, 0, 2, 10), NodeInfo(102, 1, 2, 30)]
    strategy = _strategy("fedalora", tmp_path, nodes)
    assert {k: v.shape for k, v in strategy.shared.items()} == {"l0.q.lora_B": (4, 2),
                                                                "l0.v.lora_B": (4, 2)}
    rng = np.random.default_rng(1)
    messages = list(strategy.configure_train(1, to_record(strategy.shared), ConfigRecord(), None))
    updates = [_update(strategy, n, rng) for n in nodes]
    arrays, _ = strategy.aggregate_train(1, [_reply(m, u, num_examples=n.num_examples)
                                             for m, u, n in zip(messages, updates, nodes)])
    expected = weighted_average(updates, [10, 30])
    assert all(np.allclose(to_numpy(arrays)[k], expected[k]) for k in expected)


def test_sampling_is_seeded_and_respects_min_nodes(tmp_path):
    nodes = [NodeInfo(100 + i, i, 2, 10) for i in range(10)]
    picks = []
    for _ in range(2):
        strategy = _strategy("fedalora-hetero", tmp_path, nodes, fraction_train=0.3)
        picks.append([n.partition_id for n in strategy._sample(server_round=4)])
    assert picks[0] == picks[1] and len(picks[0]) == 3
    strategy = _strategy("fedalora-hetero", tmp_path, nodes, fraction_train=0.05)
    assert len(strategy._sample(server_round=1)) == 2  # min-nodes
