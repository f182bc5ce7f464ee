"""The Flower ClientApp: one federated client per node.

The node's rank comes from node-config ``lora-rank`` when present, else from
run-config ``ranks`` indexed by ``partition-id`` (cycled); its data is partition
``partition-id`` of run-config ``dataset``, or all of node-config ``dataset`` (a file of
its own). Private tensors (A, M, the local head) are never put in a reply; they live,
tagged by round (``fedalora.state``), in the node's ``context.state`` (``state-store=memory``) or in
safetensors files on the node's own disk (``state-store=disk``) under node-config
``state-dir``, else run-config ``state-dir``, else ``<output-dir>/<run-name>/private-state``.
Training round t starts from the state saved before round t, so a retried or resumed
round repeats exactly; the train reply reports that state's round
(``private_state_round``, 0 for a fresh start).
"""

from __future__ import annotations

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

from fedalora.client import FederatedClient
from fedalora.config import FedConfig
from fedalora.errors import ConfigError, exception_line
from fedalora.outputs import EVALUATE, LOCAL_MODEL, adapter_dir
from fedalora.state import DiskStateStore, PrivateStateStore
from fedalora.types import Tensors
from strategies.protocol import (
    ARRAYS,
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
    PARTITION_ID,
    PRIVATE_STATE_ROUND,
    RANK,
    RUN_NAME,
    SERVER_ROUND,
    SHARED_ROUND,
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
    """Private state as ArrayRecords ``private.round-<t>`` in the node's ``context.state``."""

    PREFIX = "private.round-"

    def __init__(self, node_state: RecordDict) -> None:
        self.node_state = node_state

    def tags(self) -> list[int]:
        return sorted(
            int(key[len(self.PREFIX) :])
            for key in list(self.node_state)
            if key.startswith(self.PREFIX)
        )

    def _read(self, tag: int) -> Tensors:
        return {
            k: torch.from_numpy(v)
            for k, v in to_numpy(self.node_state.array_records[f"{self.PREFIX}{tag}"]).items()
        }

    def _write(self, tag: int, state: Tensors) -> None:
        self.node_state[f"{self.PREFIX}{tag}"] = to_record({k: v.numpy() for k, v in state.items()})

    def _delete(self, tag: int) -> None:
        del self.node_state[f"{self.PREFIX}{tag}"]


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report partition, rank, example counts, metric, head and labels (loads model and
    data, validating both); a configuration, model or data that cannot work is reported
    as its ConfigError, any other failure as its exception's type and message."""
    try:
        client = _client(context)
        explicit_dir = _explicit_state_dir(context, client)
        if client.config.faults.state_store == "disk" and explicit_dir:
            _check_writable(explicit_dir)
    except ConfigError as exc:
        problem = ConfigRecord({ERROR_KEY: exc.key, ERROR: exc.problem})
        return Message(RecordDict({CONFIG: problem}), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - reported to the server as the headline
        _LOG.exception("failed before training")
        failure = ConfigRecord({ERROR: exception_line(exc)})
        if "partition-id" in context.node_config:
            failure[PARTITION_ID] = int(context.node_config["partition-id"])
        return Message(RecordDict({CONFIG: failure}), reply_to=msg)
    info = ConfigRecord(
        {
            PARTITION_ID: client.partition_id,
            RANK: client.rank,
            NUM_TRAIN_EXAMPLES: client.data.num_train,
            NUM_TEST_EXAMPLES: client.data.num_test,
            METRIC: client.metric,
        }
    )
    if client.base.head_modules:
        info[HEAD] = list(client.base.head_modules)
    if client.labels:
        info[LABELS] = list(client.labels)
    return Message(RecordDict({CONFIG: info}), reply_to=msg)


@app.train()
@answers_failures
def train(msg: Message, context: Context) -> Message:
    """Train on local data from the broadcast shared state; upload the shared part only."""
    client = _client(context)
    config = msg.content.config_records[CONFIG]
    server_round = int(number(config, SERVER_ROUND))
    store = _store(context, client, config)
    private, private_round = store.load(server_round - 1)
    shared, shared_round = to_numpy(msg.content.array_records[ARRAYS]), number(config, SHARED_ROUND)
    final = bool(config.get(FINAL_ROUND, False))
    export = final and client.config.outputs.export_adapters
    result = client.train(
        shared,
        private,
        server_round,
        int(shared_round),
        final,
        adapter_dir(_run_dir(client, config), client.partition_id, LOCAL_MODEL) if export else None,
    )
    store.save(server_round, result.private)
    metrics = {**result.metrics, PRIVATE_STATE_ROUND: private_round}
    return Message(
        RecordDict(
            {
                ARRAYS: to_record(result.upload),
                METRICS: to_metrics(metrics, result.local_model),
            }
        ),
        reply_to=msg,
    )


@app.evaluate()
@answers_failures
def evaluate(msg: Message, context: Context) -> Message:
    """Score the personalised model on the held-out split; after the last round also
    export it (unless export-adapters=false)."""
    client = _client(context)
    config = msg.content.config_records[CONFIG]
    shared = to_numpy(msg.content.array_records[ARRAYS])
    shared_round, server_round = (
        int(number(config, SHARED_ROUND)),
        int(number(config, SERVER_ROUND)),
    )
    final = bool(config.get(FINAL_ROUND, False))
    store = _store(context, client, config)
    private, _ = store.load(server_round)
    metrics, private = client.evaluate(shared, private, shared_round, final, server_round)
    if final and client.config.outputs.export_adapters:
        client.export(
            shared,
            private,
            adapter_dir(_run_dir(client, config), client.partition_id, EVALUATE),
            shared_round,
            server_round,
        )
    store.save(server_round, private)
    return Message(RecordDict({METRICS: to_metrics(metrics)}), reply_to=msg)


def _client(context: Context) -> FederatedClient:
    config = FedConfig.from_run_config(context.run_config)
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ConfigError(
            "node-config",
            "needs 'partition-id' and 'num-partitions', e.g. "
            '--node-config "partition-id=0 num-partitions=3"',
        )
    partition_id, num_partitions = int(node["partition-id"]), int(node["num-partitions"])
    rank = int(node["lora-rank"]) if "lora-rank" in node else config.run.rank_for(partition_id)
    own_data = "dataset" in node
    if own_data:  # the node's own file, all of it (run-config keys keep their meaning)
        config = FedConfig.from_run_config(
            {**context.run_config, "dataset": str(node["dataset"]), "partitioning": "iid"}
        )
    return _cached_client(config, partition_id, num_partitions, rank, own_data)


@functools.lru_cache(maxsize=1024)
def _cached_client(
    config: FedConfig, partition_id: int, num_partitions: int, rank: int, own_data: bool
) -> FederatedClient:
    """One client object per worker process and node (model and data loaded once)."""
    return FederatedClient(config, partition_id, num_partitions, rank, own_data)


def _run_dir(client: FederatedClient, config: ConfigRecord) -> Path:
    return Path(client.config.outputs.output_dir).expanduser().resolve() / str(config[RUN_NAME])


def _explicit_state_dir(context: Context, client: FederatedClient) -> str:
    return str(context.node_config.get("state-dir") or client.config.faults.state_dir)


def _store(context: Context, client: FederatedClient, config: ConfigRecord) -> PrivateStateStore:
    if client.config.faults.state_store == "memory":
        return MemoryStateStore(context.state)
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
