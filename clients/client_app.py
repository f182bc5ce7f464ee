"""The Flower ClientApp: a node hosting one federated client or a cohort of them.

A node's clients (partitions of run-config ``dataset``) are node-config
``partition-ids`` (e.g. "0,4,8") of ``num-partitions``; else, with run-config
``num-clients`` > 0, node ``partition-id`` of ``num-partitions`` nodes hosts clients
``partition-id``, ``partition-id + num-partitions``, ... of ``num-clients`` (how a
simulation spreads them); else client ``partition-id`` of ``num-partitions`` alone. A
client's rank is node-config ``lora-rank`` when present, else run-config ``ranks``
indexed by its partition id (cycled); node-config ``dataset`` gives a node hosting one
client a file of its own. The clients sampled in a round train together
(``fedalora.client.train_cohort``: one batched pass per step, ``cohort-size`` at a
time) and answer in one reply, one record per client.

Private tensors (A, M, the local head) are never put in a reply; they live, per client
and tagged by round (``fedalora.state``), in the node's ``context.state``
(``state-store=memory``) or in safetensors files on the node's own disk
(``state-store=disk``, so that only the round's sampled clients are in memory) under
node-config ``state-dir``, else run-config ``state-dir``, else
``<output-dir>/<run-name>/private-state``. Training round t starts from the state saved
before round t, so a retried or resumed round repeats exactly; the train reply reports
that state's round (``private_state_round``, 0 for a fresh start).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedalora.client import FederatedClient, evaluate_cohort_clients, train_cohort
from fedalora.config import FedConfig
from fedalora.errors import ConfigError, exception_line
from fedalora.outputs import EVALUATE, LOCAL_MODEL, adapter_dir
from fedalora.state import DiskStateStore, PrivateStateStore
from fedalora.types import Arrays, Tensors
from strategies.protocol import (
    ARRAYS,
    CLIENTS,
    CONFIG,
    ERROR,
    ERROR_KEY,
    FINAL_ROUND,
    HEAD,
    LABELS,
    METRIC,
    METRICS,
    NUM_TEST_EXAMPLES,
    NUM_TRAIN_EXAMPLES,
    PRIVATE_STATE_ROUND,
    RANK,
    RUN_NAME,
    SERVER_ROUND,
    SHARED_ROUND,
    client_ids,
    keyed,
    number,
    to_metrics,
    to_numpy,
    to_record,
)

app = ClientApp()
_LOG = logging.getLogger(__name__)
Handler = Callable[[Message, Context], Message]


def answers_failures(handler: Handler) -> Handler:
    """A train or evaluate handler that answers any exception with an error reply whose
    reason is the exception's type and message (the same under Ray, in process and
    deployed), logging its traceback on the node."""

    @functools.wraps(handler)
    def handle(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the reply
            _LOG.exception("%s failed", handler.__name__)
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            return Message(Error(code, exception_line(exc)), reply_to=msg)

    return handle


class MemoryStateStore(PrivateStateStore):
    """Client ``partition_id``'s private state as ArrayRecords ``private.<id>.round-<t>``
    in the node's ``context.state``."""

    def __init__(self, node_state: RecordDict, partition_id: int) -> None:
        self.node_state = node_state
        self.prefix = f"private.{partition_id}.round-"

    def tags(self) -> list[int]:
        return sorted(
            int(key[len(self.prefix) :])
            for key in list(self.node_state)
            if key.startswith(self.prefix)
        )

    def _read(self, tag: int) -> Tensors:
        return {
            k: torch.from_numpy(v)
            for k, v in to_numpy(self.node_state.array_records[f"{self.prefix}{tag}"]).items()
        }

    def _write(self, tag: int, state: Tensors) -> None:
        self.node_state[f"{self.prefix}{tag}"] = to_record({k: v.numpy() for k, v in state.items()})

    def _delete(self, tag: int) -> None:
        del self.node_state[f"{self.prefix}{tag}"]


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report the hosted clients' partitions, ranks and example counts, their metric,
    head and labels (loads model and data, validating both); a configuration, model or
    data that cannot work is reported as its ConfigError, any other failure as its
    exception's type and message."""
    try:
        clients = list(_hosted(context).values())
        explicit_dir = _explicit_state_dir(context, clients[0])
        if clients[0].config.faults.state_store == "disk" and explicit_dir:
            _check_writable(explicit_dir)
    except ConfigError as exc:
        problem = ConfigRecord({ERROR_KEY: exc.key, ERROR: exc.problem})
        return Message(RecordDict({CONFIG: problem}), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - reported to the server as the headline
        _LOG.exception("failed before training")
        failure = ConfigRecord({ERROR: exception_line(exc)})
        with contextlib.suppress(Exception):
            failure[CLIENTS] = _partitions(context)[0]
        return Message(RecordDict({CONFIG: failure}), reply_to=msg)
    first = clients[0]
    info = ConfigRecord(
        {
            CLIENTS: [c.partition_id for c in clients],
            RANK: [c.rank for c in clients],
            NUM_TRAIN_EXAMPLES: [c.data.num_train for c in clients],
            NUM_TEST_EXAMPLES: [c.data.num_test for c in clients],
            METRIC: first.metric,
        }
    )
    if first.base.head_modules:
        info[HEAD] = list(first.base.head_modules)
    if first.labels:
        info[LABELS] = list(first.labels)
    return Message(RecordDict({CONFIG: info}), reply_to=msg)


@app.train()
@answers_failures
def train(msg: Message, context: Context) -> Message:
    """Train the sampled clients on their local data from the shared state each was
    sent (together, ``fedalora.client.train_cohort``); upload the shared parts only."""
    config = msg.content.config_records[CONFIG]
    clients = _sampled(context, config)
    server_round = int(number(config, SERVER_ROUND))
    stores = [_store(context, client, config) for client in clients]
    loaded = [store.load(server_round - 1) for store in stores]
    final = bool(config.get(FINAL_ROUND, False))
    settings = clients[0].config
    exports = [
        adapter_dir(_run_dir(c, config), c.partition_id, LOCAL_MODEL)
        if final and settings.outputs.export_adapters
        else None
        for c in clients
    ]
    results = train_cohort(
        clients,
        [_arrays(msg, c) for c in clients],
        [private for private, _ in loaded],
        server_round,
        int(number(config, SHARED_ROUND)),
        final,
        exports,
        settings.run.cohort_size,
    )
    reply = RecordDict()
    for client, store, (_, private_round), result in zip(
        clients, stores, loaded, results, strict=True
    ):
        store.save(server_round, result.private)
        reply[keyed(ARRAYS, client.partition_id)] = to_record(result.upload)
        reply[keyed(METRICS, client.partition_id)] = to_metrics(
            {**result.metrics, PRIVATE_STATE_ROUND: private_round}, result.local_model
        )
    return Message(reply, reply_to=msg)


@app.evaluate()
@answers_failures
def evaluate(msg: Message, context: Context) -> Message:
    """Score the sampled clients' personalised models on their held-out splits (together,
    ``fedalora.client.evaluate_cohort_clients``); after the last round also export them
    (unless export-adapters=false)."""
    config = msg.content.config_records[CONFIG]
    clients = _sampled(context, config)
    shared_round, server_round = (
        int(number(config, SHARED_ROUND)),
        int(number(config, SERVER_ROUND)),
    )
    final = bool(config.get(FINAL_ROUND, False))
    stores = [_store(context, client, config) for client in clients]
    shared = [_arrays(msg, client) for client in clients]
    scored = evaluate_cohort_clients(
        clients,
        shared,
        [store.load(server_round)[0] for store in stores],
        shared_round,
        final,
        server_round,
        clients[0].config.run.cohort_size,
    )
    reply = RecordDict()
    for client, store, own_shared, (metrics, private) in zip(
        clients, stores, shared, scored, strict=True
    ):
        if final and client.config.outputs.export_adapters:
            client.export(
                own_shared,
                private,
                adapter_dir(_run_dir(client, config), client.partition_id, EVALUATE),
                shared_round,
                server_round,
            )
        store.save(server_round, private)
        reply[keyed(METRICS, client.partition_id)] = to_metrics(metrics)
    return Message(reply, reply_to=msg)


def _partitions(context: Context) -> tuple[list[int], int]:
    """The node's clients (partition ids) and the number of partitions of the data set."""
    node = context.node_config
    if "num-partitions" not in node or not ({"partition-id", "partition-ids"} & set(node)):
        raise ConfigError(
            "node-config",
            "needs 'partition-id' (or 'partition-ids') and 'num-partitions', e.g. "
            '--node-config "partition-id=0 num-partitions=3"',
        )
    num_partitions = int(node["num-partitions"])
    if "partition-ids" in node:
        ids = str(node["partition-ids"]).replace(",", " ").split()
        if not ids or not all(i.isdigit() and int(i) < num_partitions for i in ids):
            raise ConfigError(
                "node-config",
                f"partition-ids '{node['partition-ids']}' must name partitions 0 .. "
                f"{num_partitions - 1} of num-partitions={num_partitions}, e.g. '0,4,8'",
            )
        return sorted({int(i) for i in ids}), num_partitions
    node_index = int(node["partition-id"])
    num_clients = int(context.run_config.get("num-clients", 0))
    if not num_clients:
        return [node_index], num_partitions
    if num_clients < num_partitions:
        raise ConfigError(
            "num-clients",
            f"{num_clients} clients cannot fill the {num_partitions} nodes (node "
            f"{node_index} would host none); use num-clients >= {num_partitions} or fewer "
            "nodes",
        )
    return list(range(node_index, num_clients, num_partitions)), num_clients


def _hosted(context: Context) -> dict[int, FederatedClient]:
    """The node's clients by partition id (each loaded once per worker process)."""
    config = FedConfig.from_run_config(context.run_config)
    partitions, num_partitions = _partitions(context)
    node = context.node_config
    own_data = "dataset" in node
    if own_data:  # the node's own file, all of it (run-config keys keep their meaning)
        if len(partitions) > 1:
            raise ConfigError(
                "node-config",
                f"'dataset' gives one client a file of its own, but this node hosts clients "
                f"{partitions}; give each such client a node of its own",
            )
        config = FedConfig.from_run_config(
            {**context.run_config, "dataset": str(node["dataset"]), "partitioning": "iid"}
        )
    ranks = {
        p: int(node["lora-rank"]) if "lora-rank" in node else config.run.rank_for(p)
        for p in partitions
    }
    return {p: _cached_client(config, p, num_partitions, ranks[p], own_data) for p in partitions}


def _sampled(context: Context, config: ConfigRecord) -> list[FederatedClient]:
    """The hosted clients a train or evaluate message names; ValueError for one this
    node does not host."""
    hosted = _hosted(context)
    wanted = client_ids(config)
    foreign = [p for p in wanted if p not in hosted]
    if foreign:
        raise ValueError(f"this node hosts clients {sorted(hosted)}, not {foreign}")
    return [hosted[p] for p in wanted]


def _arrays(msg: Message, client: FederatedClient) -> Arrays:
    return to_numpy(msg.content.array_records[keyed(ARRAYS, client.partition_id)])


@functools.lru_cache(maxsize=16384)
def _cached_client(
    config: FedConfig, partition_id: int, num_partitions: int, rank: int, own_data: bool
) -> FederatedClient:
    """One client object per worker process and client (model and data loaded once)."""
    return FederatedClient(config, partition_id, num_partitions, rank, own_data)


def _run_dir(client: FederatedClient, config: ConfigRecord) -> Path:
    return Path(client.config.outputs.output_dir).expanduser().resolve() / str(config[RUN_NAME])


def _explicit_state_dir(context: Context, client: FederatedClient) -> str:
    return str(context.node_config.get("state-dir") or client.config.faults.state_dir)


def _store(context: Context, client: FederatedClient, config: ConfigRecord) -> PrivateStateStore:
    if client.config.faults.state_store == "memory":
        return MemoryStateStore(context.state, client.partition_id)
    state_dir = _explicit_state_dir(context, client) or _run_dir(client, config) / "private-state"
    return DiskStateStore(state_dir, client.partition_id)


def _check_writable(state_dir: str) -> None:
    path = Path(state_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            "state-dir", f"cannot create '{path}': {exc}; give a writable directory on this node"
        ) from exc
    if not os.access(path, os.W_OK):
        raise ConfigError(
            "state-dir", f"'{path}' is not writable; give a writable directory on this node"
        )


__all__ = ["app"]
