"""The Flower ClientApp: one federated client per node.

The node's rank comes from node-config ``lora-rank`` when present, else from
run-config ``ranks`` indexed by ``partition-id`` (cycled). Private tensors (A, M,
the local head) live in the node's ``context.state`` and are never put in a reply.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedalora.client import FederatedClient
from fedalora.config import ConfigError, FedConfig
from fedalora.outputs import client_dir
from strategies.common import ARRAYS, CONFIG, METRICS, to_numpy, to_record

PRIVATE = "private"
app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report partition, rank and example count (loads model and data, validating both)."""
    client = _client(context)
    info = ConfigRecord({"partition-id": client.partition_id, "rank": client.rank,
                         "num-examples": client.data.num_train})
    return Message(RecordDict({CONFIG: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on local data from the broadcast shared state; upload the shared part only."""
    client = _client(context)
    config = msg.content[CONFIG]
    upload, private, metrics = client.train(to_numpy(msg.content[ARRAYS]), _private(context),
                                            int(config["server-round"]),
                                            int(config["shared-round"]))
    _store_private(context, private)
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
    metrics, private = client.evaluate(shared, _private(context), shared_round, final)
    if final and client.config.export_adapters:
        run_dir = Path(client.config.output_dir).expanduser().resolve() / str(config["run-name"])
        client.export(shared, private, client_dir(run_dir, client.partition_id) / "adapter",
                      shared_round)
    _store_private(context, private)
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


def _private(context: Context) -> dict[str, torch.Tensor] | None:
    if PRIVATE not in context.state:
        return None
    record: ArrayRecord = context.state[PRIVATE]
    return {k: torch.from_numpy(v) for k, v in to_numpy(record).items()}


def _store_private(context: Context, private: dict[str, torch.Tensor]) -> None:
    context.state[PRIVATE] = to_record({k: v.detach().cpu().numpy() for k, v in private.items()})


def _metrics(metrics: dict[str, float]) -> MetricRecord:
    return MetricRecord({"num-examples": int(metrics["num_examples"]),
                         **{k: float(v) for k, v in metrics.items() if k != "num_examples"}})


__all__ = ["app"]
