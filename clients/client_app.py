"""The Flower ClientApp: one federated client per node.

The node's rank comes from node-config ``lora-rank`` when present, else from
run-config ``ranks`` indexed by ``partition-id`` (cycled). Private tensors (A, M,
the local head) are never put in a reply; they live in the node's ``context.state``
(``state-store=memory``) or in a safetensors file per client on the node's own disk
(``state-store=disk``) under node-config ``state-dir``, else run-config ``state-dir``,
else ``<output-dir>/<run-name>/private-state``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedalora.client import FederatedClient
from fedalora.config import ConfigError, FedConfig
from fedalora.outputs import client_dir
from fedalora.state import load_private_state, private_state_path, save_private_state
from strategies.common import ARRAYS, CONFIG, METRICS, to_numpy, to_record

PRIVATE = "private"
app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report partition, rank and example count (loads model and data, validating both)."""
    client = _client(context)
    explicit_dir = _explicit_state_dir(context, client)
    if client.config.state_store == "disk" and explicit_dir:
        _check_writable(explicit_dir)
    info = ConfigRecord({"partition-id": client.partition_id, "rank": client.rank,
                         "num-examples": client.data.num_train})
    return Message(RecordDict({CONFIG: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on local data from the broadcast shared state; upload the shared part only."""
    client = _client(context)
    config = msg.content[CONFIG]
    upload, private, metrics = client.train(to_numpy(msg.content[ARRAYS]),
                                            _private(context, client, config),
                                            int(config["server-round"]),
                                            int(config["shared-round"]))
    _store_private(context, client, config, private)
    return Message(RecordDict({ARRAYS: to_record(upload), METRICS: _metrics(metrics)}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the personalised model on the held-out split; after the last round also
    export it (unless export-adapters=false)."""
    client = _client(context)
    config = msg.content[CONFIG]
    shared, shared_round = to_numpy(msg.content[ARRAYS]), int(config["shared-round"])
    final = bool(config.get("final-round", False))
    metrics, private = client.evaluate(shared, _private(context, client, config), shared_round,
                                       final)
    if final and client.config.export_adapters:
        client.export(shared, private,
                      client_dir(_run_dir(client, config), client.partition_id) / "adapter",
                      shared_round)
    _store_private(context, client, config, private)
    return Message(RecordDict({METRICS: _metrics(metrics)}), reply_to=msg)


def _client(context: Context) -> FederatedClient:
    config = FedConfig.from_run_config(context.run_config)
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ConfigError("node-config", "needs 'partition-id' and 'num-partitions', e.g. "
                          "--node-config \"partition-id=0 num-partitions=3\"")
    partition_id, num_partitions = int(node["partition-id"]), int(node["num-partitions"])
    rank = int(node["lora-rank"]) if "lora-rank" in node else config.rank_for(partition_id)
    return _cached_client(config, partition_id, num_partitions, rank)


@functools.lru_cache(maxsize=1024)
def _cached_client(config: FedConfig, partition_id: int, num_partitions: int,
                   rank: int) -> FederatedClient:
    """One client object per worker process and node (model and data loaded once)."""
    return FederatedClient(config, partition_id, num_partitions, rank)


def _run_dir(client: FederatedClient, config: ConfigRecord) -> Path:
    return Path(client.config.output_dir).expanduser().resolve() / str(config["run-name"])


def _explicit_state_dir(context: Context, client: FederatedClient) -> str:
    return str(context.node_config.get("state-dir") or client.config.state_dir)


def _state_file(context: Context, client: FederatedClient, config: ConfigRecord) -> Path:
    state_dir = (_explicit_state_dir(context, client)
                 or _run_dir(client, config) / "private-state")
    return private_state_path(state_dir, client.partition_id)


def _check_writable(state_dir: str) -> None:
    path = Path(state_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("state-dir", f"cannot create '{path}': {exc}; give a writable "
                          "directory on this node") from exc
    if not os.access(path, os.W_OK):
        raise ConfigError("state-dir", f"'{path}' is not writable; give a writable directory "
                          "on this node")


def _private(context: Context, client: FederatedClient,
             config: ConfigRecord) -> dict[str, torch.Tensor] | None:
    if client.config.state_store == "disk":
        return load_private_state(_state_file(context, client, config))
    if PRIVATE not in context.state:
        return None
    record: ArrayRecord = context.state[PRIVATE]
    return {k: torch.from_numpy(v) for k, v in to_numpy(record).items()}


def _store_private(context: Context, client: FederatedClient, config: ConfigRecord,
                   private: dict[str, torch.Tensor]) -> None:
    if client.config.state_store == "disk":
        save_private_state(_state_file(context, client, config), private)
        return
    context.state[PRIVATE] = to_record({k: v.detach().cpu().numpy() for k, v in private.items()})


def _metrics(metrics: dict[str, float]) -> MetricRecord:
    return MetricRecord({"num-examples": int(metrics["num_examples"]),
                         **{k: float(v) for k, v in metrics.items() if k != "num_examples"}})


__all__ = ["app"]
