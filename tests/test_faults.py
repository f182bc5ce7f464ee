"""Fault injection: the strategy's round loop against scripted nodes. Each kind of bad
input or fault has an asserted outcome (rejected / survived / clear error), and the
shared state is checked to be exactly what the good replies alone make of it."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedalora.aggregation import accumulate_decomposed
from fedalora.checkpoint import load_checkpoint, save_checkpoint
from fedalora.errors import ConfigError, RunFailed
from fedalora.outputs import RunRecorder, read_jsonl
from strategies import discover_nodes, run_rounds
from strategies import make_strategy as strategy_for
from strategies.protocol import ARRAYS, CONFIG, METRICS, keyed, to_numpy, to_record

from .conftest import tiny_config

LAYERS = {"l0.q": (4, 6), "l0.v": (4, 6)}
#: node id -> (partition id, rank, examples)
NODES = {101: (0, 3, 10), 102: (1, 2, 30), 103: (2, 1, 60), 104: (3, 2, 20)}
#: A fault rewrites a good train reply; None is no reply at all (a timeout).
Fault = Callable[[Message, dict], "Message | None"]


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def good_update(strategy, node_id: int, server_round: int, shared: dict) -> dict:
    """A deterministic update that depends on the node, the round and what it received."""
    _, rank, _ = NODES[node_id]
    rng = np.random.default_rng([node_id, server_round])
    offset = float(sum(np.abs(v).sum() for v in shared.values()))
    return {
        k: (0.1 * rng.normal(size=s) + 1e-3 * offset).astype(np.float32)
        for k, s in strategy.method.upload_shapes(LAYERS, rank, server_round).items()
    }


class ScriptedGrid:
    """Nodes that answer in-process; ``faults[(node id, round)]`` rewrites a train reply
    (all attempts) and ``faults[(node id, round, attempt)]`` one attempt's."""

    def __init__(
        self,
        strategy,
        faults: dict | None = None,
        evaluate_faults: dict | None = None,
        update: Callable[..., dict] = good_update,
    ):
        self.strategy, self.faults, self.update = strategy, faults or {}, update
        self.evaluate_faults = evaluate_faults or {}
        self.attempts: dict[int, int] = {}

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, timeout):
        replies = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            reply = self._answer(message, node_id)
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = node_id
                replies.append(reply)
        return replies

    def _answer(self, message: Message, node_id: int) -> Message | None:
        partition, rank, examples = NODES[node_id]
        if message.metadata.message_type == MessageType.QUERY:
            return Message(
                RecordDict(
                    {
                        CONFIG: ConfigRecord(
                            {
                                "clients": [partition],
                                "rank": [rank],
                                "num-examples": [examples],
                                "num-test-examples": [examples // 4],
                                "metric": "accuracy",
                            }
                        )
                    }
                ),
                reply_to=message,
            )
        server_round = int(message.content[CONFIG]["server-round"])
        metrics = {
            "num_examples": examples,
            "loss": 1.0,
            "accuracy": 0.5 + partition / 10,
            "seconds": 0.1,
        }
        if message.metadata.message_type == MessageType.EVALUATE:
            fault = self.evaluate_faults.get((node_id, server_round))
            reply = Message(
                RecordDict({keyed(METRICS, partition): MetricRecord(metrics)}), reply_to=message
            )
            return fault(reply, {}) if fault else reply
        key = (node_id, server_round)
        self.attempts[key] = attempt = self.attempts.get(key, 0) + 1
        update = self.update(
            self.strategy,
            node_id,
            server_round,
            to_numpy(message.content[keyed(ARRAYS, partition)]),
        )
        reply = Message(
            RecordDict(
                {
                    keyed(ARRAYS, partition): to_record(update),
                    keyed(METRICS, partition): MetricRecord({**metrics, "rank": rank}),
                }
            ),
            reply_to=message,
        )
        fault = self.faults.get((node_id, server_round, attempt)) or self.faults.get(key)
        return fault(reply, update) if fault else reply


def make_strategy(tmp_path: Path, name: str = "fedalora-hetero", **overrides):
    config = tiny_config(
        **{
            "strategy": name,
            "ranks": "3,2,1,2",
            "min_nodes": 2,
            "num_server_rounds": 2,
            **overrides,
        }
    )
    recorder = RunRecorder(tmp_path)
    recorder.start()
    return strategy_for(config, LAYERS, recorder)


def discover(strategy, grid) -> None:
    strategy.connect(discover_nodes(grid, strategy.config.run.min_nodes, timeout=5))


def run_all(strategy, grid, **kwargs):
    config = strategy.config
    return run_rounds(
        strategy,
        grid,
        retries=config.faults.round_retries,
        timeout=5,
        **kwargs,
    )


def run(tmp_path, faults=None, evaluate_faults=None, grid_class=None, **overrides):
    strategy = make_strategy(tmp_path, **overrides)
    grid = (grid_class or ScriptedGrid)(strategy, faults, evaluate_faults)
    discover(strategy, grid)
    evaluations = run_all(strategy, grid)
    return strategy, grid, evaluations


def expected_shared(tmp_path, accepted_per_round: dict[int, list[int]]) -> dict:
    """Fed-ALoRA's B0 from the given nodes' good updates only, round by round."""
    strategy = make_strategy(tmp_path / "reference")
    discover(strategy, ScriptedGrid(strategy))
    shared = strategy.shared
    for server_round, node_ids in sorted(accepted_per_round.items()):
        updates = [good_update(strategy, n, server_round, shared) for n in node_ids]
        shared = accumulate_decomposed(shared, updates, [NODES[n][2] for n in node_ids])
    return shared


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key])


def _with_arrays(transform) -> Fault:
    def fault(reply, update):
        arrays = transform({k: v.copy() for k, v in update.items()})
        own = _own(reply)
        return Message(
            RecordDict({own[ARRAYS]: to_record(arrays), own[METRICS]: reply.content[own[METRICS]]}),
            reply_to=_original(reply),
        )

    return fault


def _with_metrics(**changes) -> Fault:
    def fault(reply, update):
        own = _own(reply)
        metrics = {**dict(reply.content[own[METRICS]]), **changes}
        return Message(
            RecordDict({own[ARRAYS]: to_record(update), own[METRICS]: MetricRecord(metrics)}),
            reply_to=_original(reply),
        )

    return fault


def _own(reply: Message) -> dict[str, str]:
    """The record keys (arrays, metrics) of the one client a scripted reply is for."""
    (metrics,) = [k for k in reply.content if k.startswith(f"{METRICS}.")]
    partition = int(metrics.split(".")[1])
    return {ARRAYS: keyed(ARRAYS, partition), METRICS: metrics}


def _original(reply: Message) -> Message:
    """A stand-in for the message ``reply`` answers (Message needs one to reply to)."""
    return Message(
        RecordDict(),
        dst_node_id=reply.metadata.dst_node_id,
        message_type=reply.metadata.message_type,
    )


def _first(update: dict) -> str:
    return sorted(update)[0]


def _set_first(value: float):
    def transform(update):
        update[_first(update)][0, 0] = value
        return update

    return transform


def _error(code: int, reason: str) -> Fault:
    return lambda reply, update: Message(Error(code=code, reason=reason), reply_to=_original(reply))


# kind of fault -> (fault on node 103 in round 1, what the log must say)
REJECTED_OR_LOST = {
    "raises": (
        _error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "RuntimeError: CUDA out of memory"),
        "train failed: RuntimeError: CUDA out of memory",
    ),
    "crashes": (
        _error(ErrorCode.CLIENT_APP_CRASHED, "ClientApp process exited"),
        "train failed: ClientApp process exited",
    ),
    "disconnects": (
        _error(ErrorCode.NODE_UNAVAILABLE, "node is offline"),
        "train failed: node is offline",
    ),
    "times out": (lambda reply, update: None, "node 103 (client 2): no train reply within"),
    "wrong shape": (
        _with_arrays(lambda u: {**u, _first(u): np.zeros((5, 5), np.float32)}),
        "declares shape (5, 5)",
    ),
    "missing key": (_with_arrays(lambda u: dict(list(u.items())[1:])), "keys differ"),
    "extra key": (
        _with_arrays(lambda u: {**u, "l0.q.A": np.zeros((1, 6), np.float32)}),
        "keys differ",
    ),
    "NaN": (_with_arrays(_set_first(np.nan)), "contains NaN or Inf"),
    "Inf": (_with_arrays(_set_first(-np.inf)), "contains NaN or Inf"),
    "integer dtype": (
        _with_arrays(lambda u: {**u, _first(u): u[_first(u)].astype(np.int32)}),
        "expected a float array",
    ),
    "implausible norm": (  # B2 B1, the update it applies, 900 times an honest one
        _with_arrays(lambda u: {k: v * 30 for k, v in u.items()}),
        "times the round's median",
    ),
    "absurd norm": (
        _with_arrays(lambda u: {k: v * 1e6 for k, v in u.items()}),
        "exceeds max-update-rms=100",
    ),
    "wrong rank": (_with_metrics(rank=2), "reports rank 2 but has rank 1"),
    "zero examples": (_with_metrics(num_examples=0), "num_examples is 0"),
    "NaN loss": (_with_metrics(loss=float("nan")), "training loss is nan"),
    "no metrics": (
        lambda reply, update: Message(
            RecordDict({_own(reply)[ARRAYS]: to_record(update)}), reply_to=_original(reply)
        ),
        "no 'metrics.2' record",
    ),
    "metrics lack keys": (
        lambda reply, update: Message(
            RecordDict(
                {
                    _own(reply)[ARRAYS]: to_record(update),
                    _own(reply)[METRICS]: MetricRecord({"loss": 1.0}),
                }
            ),
            reply_to=_original(reply),
        ),
        "metrics lack",
    ),
    "no arrays": (
        lambda reply, update: Message(
            RecordDict({_own(reply)[METRICS]: reply.content[_own(reply)[METRICS]]}),
            reply_to=_original(reply),
        ),
        "no 'arrays.2' record",
    ),
}


@pytest.mark.parametrize("kind", list(REJECTED_OR_LOST))
def test_a_bad_or_lost_reply_is_left_out_and_the_round_completes(tmp_path, caplog, kind):
    fault, reason = REJECTED_OR_LOST[kind]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, _, evaluations = run(tmp_path, {(103, 1): fault})
    assert reason in caplog.text and "client 2" in caplog.text
    # round 1 from nodes 101, 102, 104 (weights renormalised over them), round 2 from all
    assert_same(
        strategy.shared, expected_shared(tmp_path, {1: [101, 102, 104], 2: [101, 102, 103, 104]})
    )
    rounds = read_jsonl(tmp_path / "rounds.jsonl")
    assert [r["attempts"] for r in rounds] == [1, 1] and not any(r["skipped"] for r in rounds)
    assert rounds[0]["failed"] + rounds[0]["rejected"] == 1
    assert set(evaluations) == {1, 2}


def test_a_reply_from_a_node_that_was_not_asked_is_ignored(tmp_path, caplog):
    class Impostor(ScriptedGrid):
        def send_and_receive(self, messages, timeout):
            replies = super().send_and_receive(messages, timeout)
            for reply in replies:
                if reply.metadata.src_node_id == 104 and MessageType.TRAIN in str(
                    reply.metadata.message_type
                ):
                    reply.metadata.__dict__["_src_node_id"] = 999
            return replies

    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, _, _ = run(tmp_path, grid_class=Impostor)
    assert "reply from node 999, which was not asked" in caplog.text
    assert_same(
        strategy.shared, expected_shared(tmp_path, {1: [101, 102, 103], 2: [101, 102, 103]})
    )


def test_too_few_replies_retry_the_round_with_a_fresh_attempt(tmp_path, caplog):
    lost = lambda reply, update: None  # noqa: E731
    faults = {(n, 1, 1): lost for n in (101, 102, 103)}  # only 104 answers the first try
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, grid, _ = run(tmp_path, faults)
    assert "fewer than min-nodes=2" in caplog.text and "retrying (1 of 1)" in caplog.text
    assert grid.attempts[(101, 1)] == 2
    assert_same(
        strategy.shared,
        expected_shared(tmp_path, {1: [101, 102, 103, 104], 2: [101, 102, 103, 104]}),
    )
    assert [r["attempts"] for r in read_jsonl(tmp_path / "rounds.jsonl")] == [2, 1]


def test_a_round_that_stays_below_min_nodes_is_skipped_and_the_run_goes_on(tmp_path, caplog):
    nan = _with_arrays(_set_first(np.nan))
    faults = {(n, 1): nan for n in (101, 102, 103)}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, grid, evaluations = run(tmp_path, faults, round_retries=2)
    assert "round 1 skipped after 3 attempts" in caplog.text
    assert grid.attempts[(101, 1)] == 3
    # round 1 left B0 at zero; round 2 aggregated everyone from there
    assert_same(strategy.shared, expected_shared(tmp_path, {2: [101, 102, 103, 104]}))
    rounds = read_jsonl(tmp_path / "rounds.jsonl")
    assert [r["skipped"] for r in rounds] == [True, False] and set(evaluations) == {1, 2}
    assert strategy.shared_round == 2


def test_a_failed_evaluation_leaves_the_others_scores(tmp_path, caplog):
    evaluate_faults = {(102, 2): _error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "disk full")}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, _, evaluations = run(tmp_path, evaluate_faults=evaluate_faults)
    assert "evaluate failed: disk full" in caplog.text
    assert evaluations[2]["mean-accuracy"] == pytest.approx(np.mean([0.5, 0.7, 0.8]))


def test_without_final_evaluation_no_node_is_evaluated_after_aggregation(tmp_path):
    _, grid, evaluations = run(tmp_path, final_evaluation=False, fraction_evaluate=0.0)
    assert evaluations == {}  # every node trained in both rounds; none was evaluated
    rounds = read_jsonl(tmp_path / "rounds.jsonl")
    assert [r["evaluate_clients"] for r in rounds] == [0, 0] and len(grid.attempts) == 8


def test_a_node_failing_discovery_stops_the_run_before_training(tmp_path):
    strategy = make_strategy(tmp_path)

    class Broken(ScriptedGrid):
        def _answer(self, message, node_id):
            if node_id == 102:
                return Message(
                    Error(
                        code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                        reason="run-config 'dataset': file 'x.csv' does not exist",
                    ),
                    reply_to=message,
                )
            return super()._answer(message, node_id)

    with pytest.raises(RunFailed, match=r"^node 102 failed before training: run-config 'dataset'"):
        discover(strategy, Broken(strategy))


def test_a_configuration_error_on_the_nodes_is_raised_once_with_its_key_and_fix(tmp_path):
    strategy = make_strategy(tmp_path)
    problem = "file 'x.csv' is empty; give a file with a header row and rows"

    class Misconfigured(ScriptedGrid):
        def _answer(self, message, node_id):
            if node_id == 104:
                return super()._answer(message, node_id)
            record = ConfigRecord({"error-key": "dataset", "error": problem})
            return Message(RecordDict({CONFIG: record}), reply_to=message)

    with pytest.raises(ConfigError) as info:
        discover(strategy, Misconfigured(strategy))
    assert info.value.key == "dataset"
    assert str(info.value) == (
        f"run-config 'dataset': {problem} [reported by 3 of 4 nodes: 101, 102, 103]"
    )


def test_the_superlinks_error_reply_for_a_dead_node_names_that_node(tmp_path, caplog):
    """Flower answers for a SuperNode that died with an error reply from the SuperLink
    (node 1) that replies to the message sent: it is that node's failure."""

    class DeadNode(ScriptedGrid):
        def send_and_receive(self, messages, timeout):
            messages = list(messages)
            for number, message in enumerate(messages):
                message.metadata.__dict__["_message_id"] = f"m{number}"
            replies = super().send_and_receive(messages, timeout)
            for reply in replies:
                sent = next(
                    m
                    for m in messages
                    if m.metadata.message_id == reply.metadata.reply_to_message_id
                )
                if sent.metadata.dst_node_id == 103 and MessageType.TRAIN in str(
                    reply.metadata.message_type
                ):
                    dead = Message(
                        Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable"), reply_to=sent
                    )
                    dead.metadata.__dict__["_src_node_id"] = 1
                    replies[replies.index(reply)] = dead
            return replies

    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, _, _ = run(tmp_path, grid_class=DeadNode)
    assert "node 103 (client 2): train failed: Error: Node Unavailable" in caplog.text
    assert "not asked" not in caplog.text and "no train reply" not in caplog.text
    assert_same(
        strategy.shared, expected_shared(tmp_path, {1: [101, 102, 104], 2: [101, 102, 104]})
    )


@pytest.mark.parametrize("name", ["fedalora-hetero", "hetlora", "flora", "zeropad"])
def test_checkpoint_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, name):
    ranks = {} if name != "hetlora" else {"rank_decay": 0.5}

    def fresh(folder, rounds):
        strategy = make_strategy(tmp_path / folder, name, num_server_rounds=rounds, **ranks)
        grid = ScriptedGrid(strategy)
        discover(strategy, grid)
        return strategy, grid

    whole, grid = fresh("whole", 4)
    run_all(whole, grid)

    # the run dies after round 2's checkpoint: rounds 1-2, checkpoints, then nothing kept
    first_half, grid = fresh("killed", 2)
    run_all(
        first_half,
        grid,
        on_round_end=lambda r: save_checkpoint(tmp_path / "killed", first_half.checkpoint(r)),
    )
    saved = load_checkpoint(tmp_path / "killed")
    assert saved.server_round == 2 and saved.rng_state["next-round"] == 3
    resumed, grid = fresh("killed", 4)
    resumed.restore(saved)
    run_all(resumed, grid, first_round=3)
    assert resumed.shared_round == whole.shared_round == 4
    assert_same(resumed.shared, whole.shared)
    for client in whole.clients.values():
        assert resumed.clients[client.partition_id] == client


def test_a_checkpoint_holds_only_shared_state_and_is_replaced_atomically(tmp_path):
    strategy, _, _ = run(tmp_path)
    path = save_checkpoint(tmp_path, strategy.checkpoint(2))
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["server-state-round-2.safetensors", "shared-round-2.safetensors", "state.json"]
    saved = load_checkpoint(tmp_path)
    assert set(saved.shared) == {f"{m}.B0" for m in LAYERS}  # no A, M, B1, B2
    assert saved.server_state == {}  # Fed-ALoRA keeps nothing else on the server
    assert [c["rank"] for c in saved.clients] == [3, 2, 1, 2]


def test_resume_refuses_other_clients_or_state_shapes(tmp_path):
    strategy, _, _ = run(tmp_path)
    saved = strategy.checkpoint(2)
    other = make_strategy(tmp_path / "other")
    discover(other, ScriptedGrid(other))
    del other.clients[NODES[104][0]]
    with pytest.raises(ConfigError, match=r"'resume'.*clients \[0, 1, 2, 3\].*\[0, 1, 2\]"):
        other.restore(saved)
    wider = make_strategy(tmp_path / "wider", intermediate_rank=8)
    discover(wider, ScriptedGrid(wider))
    with pytest.raises(ConfigError, match=r"'resume'.*does not fit"):
        wider.restore(saved)


def test_nothing_is_pickled_anywhere():
    """What crosses the network is Flower records; what is read back from disk is
    safetensors or JSON. No module of ours may use pickle-based I/O."""
    root = Path(__file__).resolve().parents[1]
    banned = re.compile(
        r"\bimport pickle\b|\bpickle\.|cloudpickle|joblib|torch\.load\(|"
        r"allow_pickle\s*=\s*True|np\.load\(|numpy\.load\(|\.npz\b"
    )
    sources = [
        *root.glob("*.py"),
        *(
            path
            for folder in ("fedalora", "clients", "server", "strategies", "benchmarks")
            for path in (root / folder).rglob("*.py")
        ),
    ]
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if banned.search(line)
    ]
    assert offenders == []


def _bad_data(tmp_path: Path, kind: str) -> dict:
    """Run-config and node-config values of one kind of bad data or model."""
    rows = "text,label\n" + "".join(f"example {i},{i % 2}\n" for i in range(6))
    if kind == "missing data file":
        return {"dataset": str(tmp_path / "absent.csv")}
    if kind == "empty data file":
        (tmp_path / "empty.csv").write_text("text,label\n")
        return {"dataset": str(tmp_path / "empty.csv")}
    if kind == "more clients than examples":
        (tmp_path / "six.csv").write_text(rows)
        return {"dataset": str(tmp_path / "six.csv"), "partitioning": "iid", "clients": 8}
    if kind == "empty partition":
        (tmp_path / "six.csv").write_text(rows)
        return {"dataset": str(tmp_path / "six.csv"), "partitioning": "iid", "clients": 6}
    if kind == "unreadable model path":
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text("{not json")
        return {"model": str(tmp_path / "model")}
    if kind == "rank above the layer":
        return {"lora-rank": 100_000}
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind, key, fix",
    [
        ("missing data file", "dataset", "give an existing .json/.jsonl/.csv file"),
        ("empty data file", "dataset", "at least one row per client"),
        ("more clients than examples", "partitioning", "use fewer clients or more data"),
        ("empty partition", "partitioning", "use fewer clients, more data"),
        ("unreadable model path", "model", "readable local path"),
        ("rank above the layer", "lora-rank", "use a rank <= 384"),
    ],
)
def test_bad_data_or_model_fails_at_discovery_naming_the_field_and_the_fix(
    tmp_path, kind, key, fix
):
    from clients import client_app

    values = _bad_data(tmp_path, kind)
    node = {"partition-id": 0, "num-partitions": values.pop("clients", 3)}
    if "lora-rank" in values:
        node["lora-rank"] = values.pop("lora-rank")
    config = tiny_config(
        strategy="fedalora-hetero",
        ranks="8,4,2",
        **{k.replace("-", "_"): v for k, v in values.items()},
    )
    context = Context(
        run_id=1, node_id=1, state=RecordDict(), node_config=node, run_config=config.to_run_config()
    )
    query = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    reply = client_app.query(query, context).content.config_records[CONFIG]
    assert reply["error-key"] == key and fix in str(reply["error"])


def test_a_client_that_crashes_before_training_is_the_headline_with_its_own_error(tmp_path):
    """Not a ConfigError: its client, exception type and message, never a made-up key."""
    strategy = make_strategy(tmp_path)

    class Crashing(ScriptedGrid):
        def _answer(self, message, node_id):
            if node_id == 102 and message.metadata.message_type == MessageType.QUERY:
                failure = {"error": "TypeError: '<' not supported", "clients": [1]}
                return Message(RecordDict({CONFIG: ConfigRecord(failure)}), reply_to=message)
            return super()._answer(message, node_id)

    with pytest.raises(RunFailed) as failed:
        discover(strategy, Crashing(strategy))
    assert str(failed.value) == (
        "client 1 (node 102) failed before training: TypeError: '<' not supported"
    )


def test_a_client_with_few_held_out_examples_is_warned_about(tmp_path, caplog):
    strategy = make_strategy(tmp_path)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        discover(strategy, ScriptedGrid(strategy))
    warned = [r.getMessage() for r in caplog.records if "held-out examples" in r.getMessage()]
    assert warned == [  # node 101 holds 10 // 4 = 2 test examples, the others 5 or more
        "client 0 has 2 held-out examples (fewer than 5), so its scores are coarse; use "
        "fewer clients, more data or a larger test-fraction"
    ]


def test_a_run_in_which_every_train_reply_fails_has_no_result(tmp_path):
    strategy = make_strategy(tmp_path, round_retries=0)
    crash = _error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "ValueError: bad batch")
    grid = ScriptedGrid(strategy, faults={(n, r): crash for n in NODES for r in (1, 2)})
    discover(strategy, grid)
    run_all(strategy, grid)
    assert strategy.trained_rounds == 0
    with pytest.raises(RunFailed) as failed:
        strategy.require_training()
    assert str(failed.value) == (
        "no round trained: clients 0, 1, 2, 3: train failed: ValueError: bad batch"
    )
    strategy.trained_rounds = 1  # one aggregated round is a result
    strategy.require_training()
