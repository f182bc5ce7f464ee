"""Cohorts in a run: a node hosting several clients gives every method, with every LoRA
variant it accepts, the run that one client per node gives (dropout off): the same
aggregates, per-client metrics and exported adapters, to 1e-5 relative. And the Flower
side of hosting: which clients a node hosts, sampling clients rather than nodes, one
message per node, a failed node failing all of its clients, private state per client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from clients import client_app
from fedalora.client import FederatedClient
from fedalora.errors import ConfigError
from fedalora.methods import registered_methods
from fedalora.outputs import read_jsonl
from server.in_process import run_in_process
from strategies.protocol import ARRAYS, CONFIG, METRICS, client_ids, keyed, to_record

from .conftest import TINY_OPTIONS, dropout_off, tiny_config

APP = Path(__file__).resolve().parents[1]
RELATIVE, ABSOLUTE = 1e-5, 1e-6
TINY = (
    "num-hidden-layers=2 local-steps=3 batch-size=8 max-length=32 dataset='bbc-news' "
    "lr=0.001 test-fraction=0.05 lora-dropout=0.0 fraction-evaluate=0"
)
BUILT_IN = registered_methods(built_in=True)
#: Variants a cohort batches (each client's own optimiser); the others train each client
#: alone inside its node (``ClientAdapter.cohort_problem``), the code path of one client
#: per node, so one method shows them.
BATCHED_VARIANTS = {"lora-plus-ratio": "lora-plus-ratio=4.0", "lora-fa": "lora-fa=true"}
UNBATCHED = {
    "dora": "dora=true",
    "dora-shared-magnitude": "dora=true dora-magnitude='shared'",
    "pissa": "lora-init='pissa'",
}


def _options(name: str) -> str:
    own = BUILT_IN[name].Options.fields_by_key()
    return " ".join(f"{k}={v}" for k, v in TINY_OPTIONS.items() if k in own)


def _ranks(name: str) -> str:
    return "8,4,2" if BUILT_IN[name].heterogeneous else "4"


#: case id -> extra run-config: every method (different ranks where it takes them) over
#: two rounds, every batched variant on every method that accepts it over one (a
#: variant acts in the local steps), the unbatched ones on FedIT, and client-level DP
#: (per-client clipping and noise, the ledger) with cohorts of 2 (the node's 3 clients
#: in a chunk of 2 and one alone, training and scoring).
CASES = {
    **{
        name: f"strategy='{name}' ranks='{_ranks(name)}' {_options(name)} num-server-rounds=2"
        for name in BUILT_IN
    },
    **{
        f"{name}+{variant}": f"strategy='{name}' ranks='{_ranks(name)}' {_options(name)} {extra} "
        "num-server-rounds=1"
        for name, cls in BUILT_IN.items()
        for variant, extra in BATCHED_VARIANTS.items()
        if variant in cls.accepts
    },
    **{
        f"fedit+{variant}": f"strategy='fedit' ranks='4' {extra} num-server-rounds=1"
        for variant, extra in UNBATCHED.items()
    },
    "fedalora-hetero+dp": "strategy='fedalora-hetero' ranks='8,4,2' intermediate-rank=4 "
    "dp-clip=0.5 dp-noise-multiplier=0.5 num-server-rounds=2 cohort-size=2",
}


@pytest.fixture(scope="module")
def no_dropout() -> Iterator[None]:
    with dropout_off(FederatedClient(tiny_config(), 0, 3, 2).base.model):
        yield


def _run(tmp_path: Path, name: str, run_config: str, nodes: int, cohort: str = "") -> Path:
    run_dir = run_in_process(
        APP,
        name,
        num_supernodes=nodes,
        output_dir=tmp_path,
        run_config=f"{TINY} {run_config} {cohort}",
        log_path=tmp_path / f"{name}.log",
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")
    return run_dir


def _close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Equal to 1e-5 relative, entries near zero to 1e-6 (as ``tests/test_cohort.py``
    compares one round)."""
    np.testing.assert_allclose(actual, expected, rtol=RELATIVE, atol=ABSOLUTE, err_msg=what)


def _rows(run_dir: Path) -> dict[tuple, dict]:
    return {(r["round"], r["phase"], r["client"]): r for r in read_jsonl(run_dir / "metrics.jsonl")}


@pytest.mark.parametrize("case", list(CASES))
def test_a_node_hosting_a_cohort_gives_the_run_of_one_client_per_node(no_dropout, tmp_path, case):
    """Three clients on three nodes, against the same three hosted by one node: the
    shared state after each round (checkpoint of the last), every client's metrics in
    both protocols and bytes each way, and every exported adapter."""
    alone = _run(tmp_path, "alone", CASES[case], nodes=3)
    together = _run(tmp_path, "cohort", CASES[case], nodes=1, cohort="num-clients=3 min-nodes=1")
    ours, theirs = (load_file(str(d / "shared_state.safetensors")) for d in (together, alone))
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        _close(ours[key], value, key)
    rows, expected_rows = _rows(together), _rows(alone)
    assert rows.keys() == expected_rows.keys()
    for where, expected in expected_rows.items():
        row = rows[where]
        assert row.keys() == expected.keys(), where
        for field, value in expected.items():
            if field == "seconds":
                continue
            if isinstance(value, float):
                assert row[field] == pytest.approx(value, rel=RELATIVE, abs=ABSOLUTE), (
                    where,
                    field,
                )
            else:
                assert row[field] == value, (where, field)
    exports = sorted(p.relative_to(alone) for p in alone.glob("clients/*/*/*.safetensors"))
    assert exports and exports == sorted(
        p.relative_to(together) for p in together.glob("clients/*/*/*.safetensors")
    )
    for path in exports:
        ours, theirs = (_applied(load_file(str(run / path))) for run in (together, alone))
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            _close(ours[key], value, f"{path}:{key}")


def _applied(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An exported adapter's tensors, each layer's factors as the update B A they apply
    (FLoRA's exported factors come from an SVD, whose near-zero singular directions are
    arbitrary)."""
    applied = {k: v for k, v in tensors.items() if ".lora_A." not in k and ".lora_B." not in k}
    for key in (k for k in tensors if ".lora_A." in k):
        b = tensors[key.replace(".lora_A.", ".lora_B.")].astype(np.float64)
        applied[key.replace(".lora_A.", ".update.")] = b @ tensors[key]
    return applied


# ------------------------------------------------------------------ hosting
@pytest.fixture
def task_identity() -> None:
    """Messages are created inside a task, as Flower's runtime sets it up."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 100


def _context(run_config: dict, **node: object) -> Context:
    return Context(
        run_id=1, node_id=100, state=RecordDict(), node_config=node, run_config=run_config
    )


def test_a_node_hosts_every_n_th_client_or_the_partitions_it_names():
    config = tiny_config(num_clients=8).to_run_config()
    assert client_app._partitions(_context(config, **{"partition-id": 1, "num-partitions": 3})) == (
        [1, 4, 7],
        8,
    )
    one_each = tiny_config().to_run_config()
    assert client_app._partitions(
        _context(one_each, **{"partition-id": 1, "num-partitions": 3})
    ) == ([1], 3)
    named = _context(one_each, **{"partition-ids": "6, 2,4", "num-partitions": 9})
    assert client_app._partitions(named) == ([2, 4, 6], 9)


@pytest.mark.parametrize(
    ("run_config", "node", "key", "fix"),
    [
        ({"num_clients": 2}, {"partition-id": 2, "num-partitions": 3}, "num-clients", ">= 3"),
        ({}, {"partition-ids": "1,9", "num-partitions": 4}, "node-config", "0 .. 3"),
        ({}, {"num-partitions": 4}, "node-config", "partition-ids"),
        (
            {"num_clients": 6},
            {"partition-id": 0, "num-partitions": 2, "dataset": "mine.csv"},
            "node-config",
            "a node of its own",
        ),
    ],
)
def test_a_node_that_cannot_host_its_clients_says_why_at_discovery(
    task_identity, run_config, node, key, fix
):
    context = _context(tiny_config(**run_config).to_run_config(), **node)
    query = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    reply = client_app.query(query, context).content.config_records[CONFIG]
    assert reply["error-key"] == key and fix in str(reply["error"])
    with pytest.raises(ConfigError, match=key):
        client_app._hosted(context)


def test_a_cohort_reply_carries_only_the_sampled_clients_uploads(task_identity):
    """A node hosting clients 0, 2 and 4 of 6, asked for 0 and 4: one reply with their
    uploads and metrics; every private tensor stays in the node's state, per client."""
    config = tiny_config(strategy="fedalora-hetero", ranks="8,4,2", num_clients=6)
    context = _context(config.to_run_config(), **{"partition-id": 0, "num-partitions": 2})
    hosted = client_app._hosted(context)
    assert sorted(hosted) == [0, 2, 4]
    layers = hosted[0].base.layer_shapes()
    shared = config.method.initial_shared(layers, [c.rank for c in hosted.values()])
    content = RecordDict(
        {
            CONFIG: ConfigRecord(
                {"clients": [0, 4], "server-round": 1, "shared-round": 0, "run-name": "t"}
            )
        }
    )
    for p in (0, 4):
        content[keyed(ARRAYS, p)] = to_record(shared)
    reply = client_app.train(
        Message(content, dst_node_id=1, message_type=MessageType.TRAIN), context
    )
    assert not reply.has_error()
    assert set(reply.content) == {keyed(kind, p) for kind in (ARRAYS, METRICS) for p in (0, 4)}
    for p in (0, 4):
        upload = reply.content.array_records[keyed(ARRAYS, p)]
        assert set(upload) == set(config.method.upload_shapes(layers, hosted[p].rank, 1))
        private, tag = client_app.MemoryStateStore(context.state, p).load(1)
        assert tag == 1 and any(k.endswith(".A") for k in private)
    assert client_app.MemoryStateStore(context.state, 2).load(1) == (None, 0)  # not sampled


def test_clients_are_sampled_and_a_failed_node_fails_all_of_its_clients_once(tmp_path):
    """Six clients on two nodes, half of them sampled per round: at most one message per
    node, naming its sampled clients; node 100 (clients 0, 2, 4) fails round 1, which is
    logged once with its clients and counted for each; the others' updates are
    aggregated."""
    sent: list[tuple[int, int, list[int]]] = []  # (round, node, clients)

    def flaky(message: Message, context: Context) -> Message:
        config = message.content.config_records[CONFIG]
        if message.metadata.message_type == MessageType.TRAIN:
            server_round = int(config["server-round"])  # type: ignore[arg-type]
            sent.append((server_round, context.node_id, client_ids(config)))
            if context.node_id == 100 and server_round == 1:
                raise RuntimeError("out of memory")
        return client_app.app(message, context)

    run_dir = run_in_process(
        APP,
        "flaky",
        num_supernodes=2,
        output_dir=tmp_path,
        run_config=f"{TINY} strategy='fedit' ranks='4' num-clients=6 fraction-train=0.5 "
        "min-nodes=1 round-retries=0 num-server-rounds=2",
        node_app=flaky,
    )
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    hosts = {100: {0, 2, 4}, 101: {1, 3, 5}}
    for server_round in (1, 2):
        messages = [(node, ids) for r, node, ids in sent if r == server_round]
        assert len({node for node, _ in messages}) == len(messages)  # one per node
        assert sum(len(ids) for _, ids in messages) == 3
        assert all(set(ids) <= hosts[node] for node, ids in messages)
    (failed_clients,) = [ids for r, node, ids in sent if r == 1 and node == 100]
    who = f"node 100 (client{'s' if len(failed_clients) > 1 else ''} "
    who += ", ".join(map(str, failed_clients)) + ")"
    warnings = list((run_dir / "warnings.log").read_text().splitlines())
    assert [line for line in warnings if "out of memory" in line and who in line] == [
        line for line in warnings if "out of memory" in line
    ]
    assert len([line for line in warnings if "out of memory" in line]) == 1
    assert read_jsonl(run_dir / "rounds.jsonl")[0]["failed"] == len(failed_clients)
    trained = {
        r["client"]
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r["phase"] == "train" and r["round"] == 1
    }
    assert trained == {p for r, node, ids in sent if r == 1 and node == 101 for p in ids}


def test_two_nodes_hosting_one_client_fail_at_discovery(tmp_path):
    def overlapping(message: Message, context: Context) -> Message:
        if context.node_id == 101:  # names client 0, which node 100 hosts too
            context.node_config["partition-ids"] = "0,1"
        return client_app.app(message, context)

    with pytest.raises(ConfigError, match="client 0 is hosted by nodes"):
        run_in_process(
            APP,
            "twice",
            num_supernodes=2,
            output_dir=tmp_path,
            run_config=TINY,
            node_app=overlapping,
        )
    summary = json.loads((tmp_path / "twice" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error_key"] == "node-config"
    assert "client 0 is hosted by nodes [100, 101]" in summary["error"]


def test_a_resumed_cohort_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path):
    """Five clients on two nodes, three sampled per round, private state on disk: one
    round, then resumed for the second, gives the two-round run."""
    run_config = (
        TINY + " strategy='fedalora-hetero' ranks='8,4,2' intermediate-rank=4 num-clients=5 "
        "fraction-train=0.6 state-store='disk'"
    )
    whole = run_in_process(
        APP,
        "whole",
        num_supernodes=2,
        output_dir=tmp_path,
        run_config=f"{run_config} num-server-rounds=2",
    )
    run_in_process(
        APP,
        "halves",
        num_supernodes=2,
        output_dir=tmp_path,
        run_config=f"{run_config} num-server-rounds=1",
    )
    halves = run_in_process(
        APP,
        "halves",
        num_supernodes=2,
        output_dir=tmp_path,
        run_config=f"{run_config} num-server-rounds=2 resume=true",
    )
    assert json.loads((halves / "summary.json").read_text())["resumed_after_round"] == 1
    ours, theirs = (load_file(str(d / "shared_state.safetensors")) for d in (halves, whole))
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    rows = [
        {
            (r["round"], r["phase"], r["client"]): r["loss"]
            for r in read_jsonl(d / "metrics.jsonl")
            if r["round"] == 2
        }
        for d in (halves, whole)
    ]
    assert rows[0] == rows[1] and len(rows[0]) >= 3
    assert len(list((whole / "private-state").glob("client-*.safetensors"))) >= 5
