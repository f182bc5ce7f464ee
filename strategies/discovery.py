"""Discovery: the query round before training, in which every node reports its
partition, its LoRA rank and its number of training examples (the server cannot read
a node's node-config)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import INFO

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedalora.errors import ConfigError
from fedalora.methods import Participant
from protocol import CONFIG, NUM_TRAIN_EXAMPLES, PARTITION_ID, RANK, number


@dataclass(frozen=True)
class Node(Participant):
    """A client as the server addresses it: its Flower node id and what it reported."""

    node_id: int


def discover_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[Node]:
    """Wait for ``min_nodes`` nodes, then ask every connected node about itself.

    Raises ConfigError before any training if too few nodes connect or a node fails
    (its ClientApp validates its configuration, model and data when asked).
    """
    node_ids = _wait_for_nodes(grid, min_nodes, timeout)
    queries = [
        Message(
            RecordDict({CONFIG: ConfigRecord({"query": "node-info"})}),
            dst_node_id=node_id,
            message_type=MessageType.QUERY,
        )
        for node_id in node_ids
    ]
    nodes = []
    for reply in grid.send_and_receive(queries, timeout=timeout):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            raise ConfigError(
                "node", f"node {node_id} failed before training: {reply.error.reason}"
            )
        info = reply.content.config_records[CONFIG]
        nodes.append(
            Node(
                partition_id=int(number(info, PARTITION_ID)),
                rank=int(number(info, RANK)),
                num_examples=int(number(info, NUM_TRAIN_EXAMPLES)),
                node_id=node_id,
            )
        )
    return nodes


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise ConfigError(
                "min-nodes",
                f"only {len(node_ids)} nodes connected within "
                f"{timeout:.0f} s, min-nodes={minimum}; start more nodes or "
                "lower min-nodes",
            )
        log(INFO, "waiting for nodes: %d connected, min-nodes=%d", len(node_ids), minimum)
        time.sleep(1.0)
    return node_ids
