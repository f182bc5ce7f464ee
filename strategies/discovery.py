"""Discovery: the query round before training, in which every node reports the clients
it hosts (their partitions, LoRA ranks and numbers of examples), the metric they are
scored by, their local head and their labels (the server cannot read a node's
node-config)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedalora.errors import ConfigError, RunFailed
from fedalora.methods import Participant

from .protocol import (
    CLIENTS,
    CONFIG,
    ERROR,
    ERROR_KEY,
    HEAD,
    LABELS,
    METRIC,
    NUM_TEST_EXAMPLES,
    NUM_TRAIN_EXAMPLES,
    RANK,
    client_ids,
    destinations,
    reply_sender,
)

#: Fewer held-out examples than this make a client's scores too coarse to compare.
FEW_TEST_EXAMPLES = 5


@dataclass(frozen=True)
class Node(Participant):
    """A client as the server addresses it: the Flower node id of the node hosting it
    and what that node reported of it."""

    node_id: int
    num_test_examples: int = 0
    metric: str = "accuracy"
    head: tuple[str, ...] = field(default=())
    labels: tuple[str, ...] = field(default=())


def discover_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[Node]:
    """Wait for ``min_nodes`` nodes, then ask every connected node about itself.

    Raises ConfigError before any training if too few nodes connect or a node cannot
    take part: a node's own ConfigError (its ClientApp validates its configuration, model
    and data when asked) is raised once, with its key and fix, however many nodes report
    it. A node that failed otherwise raises RunFailed with its client, the exception's
    type and its message. ConfigError if two nodes claim the same client. Warns about
    clients with fewer than 5 held-out examples.
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
    replies = list(grid.send_and_receive(queries, timeout=timeout))
    sent_to = destinations(queries)
    nodes: list[Node] = []
    problems: defaultdict[tuple[str, str], list[int]] = defaultdict(list)
    failures: defaultdict[str, list[str]] = defaultdict(list)  # error -> "client p (node n)"
    for reply in replies:
        node_id = reply_sender(reply, sent_to)
        if reply.has_error():
            failures[str(reply.error.reason)].append(f"node {node_id}")
            continue
        info = reply.content.config_records[CONFIG]
        if ERROR_KEY in info:
            problems[(str(info[ERROR_KEY]), str(info[ERROR]))].append(node_id)
        elif ERROR in info:
            who = f"node {node_id}"
            if CLIENTS in info:
                hosted = client_ids(info)
                who = f"client{'s' if len(hosted) > 1 else ''} {listed(hosted)} ({who})"
            failures[str(info[ERROR])].append(who)
        else:
            nodes += _hosted(info, node_id)
    if problems:
        ranked = sorted(problems.items(), key=lambda item: -len(item[1]))
        for (key, problem), reporters in ranked[1:]:
            log(WARNING, "run-config '%s': %s [nodes %s]", key, problem, reporters)
        (key, problem), reporters = ranked[0]
        others = len(ranked) - 1
        raise ConfigError(
            key,
            f"{problem} [reported by {len(reporters)} of {len(node_ids)} nodes: "
            f"{', '.join(map(str, sorted(reporters)[:5]))}{', ...' if len(reporters) > 5 else ''}"
            + (f"; {others} other problem(s) in the log]" if others else "]"),
        )
    if failures:
        ranked_failures = sorted(failures.items(), key=lambda item: -len(item[1]))
        for failure, clients in ranked_failures[1:]:
            log(WARNING, "%s failed before training: %s", ", ".join(clients), failure)
        failure, clients = ranked_failures[0]
        shown = ", ".join(clients[:5]) + (", ..." if len(clients) > 5 else "")
        raise RunFailed(
            f"{shown} failed before training: {failure}"
            + (f" [{len(clients)} of {len(node_ids)} nodes]" if len(clients) > 1 else "")
        )
    hosts: defaultdict[int, list[int]] = defaultdict(list)
    for node in nodes:
        hosts[node.partition_id].append(node.node_id)
    twice = {p: ids for p, ids in hosts.items() if len(ids) > 1}
    if twice:
        client, ids = min(twice.items())
        raise ConfigError(
            "node-config",
            f"client {client} is hosted by nodes {ids} ({len(twice)} client(s) twice); give "
            "each node its own partition-id or partition-ids",
        )
    few = sorted(
        (n.partition_id, n.num_test_examples)
        for n in nodes
        if n.num_test_examples < FEW_TEST_EXAMPLES
    )
    if few:  # one line, however many clients
        counts = [count for _, count in few]
        who = (
            f"client {few[0][0]} has {counts[0]}"
            if len(few) == 1
            else f"{len(few)} clients ({listed([p for p, _ in few])}) have {min(counts)} to "
            f"{max(counts)}"
        )
        log(
            WARNING,
            "%s held-out examples (fewer than %d), so %s scores are coarse; use fewer "
            "clients, more data or a larger test-fraction",
            who,
            FEW_TEST_EXAMPLES,
            "its" if len(few) == 1 else "their",
        )
    return nodes


def _hosted(info: ConfigRecord, node_id: int) -> list[Node]:
    """The clients of a node's discovery reply."""
    ranks, train, test = (
        [int(v) for v in info[key]]  # type: ignore[union-attr]
        for key in (RANK, NUM_TRAIN_EXAMPLES, NUM_TEST_EXAMPLES)
    )
    return [
        Node(
            partition_id=partition_id,
            rank=ranks[k],
            num_examples=train[k],
            node_id=node_id,
            num_test_examples=test[k],
            metric=str(info[METRIC]),
            head=tuple(str(h) for h in info.get(HEAD, [])),  # type: ignore[union-attr]
            labels=tuple(str(label) for label in info.get(LABELS, [])),  # type: ignore[union-attr]
        )
        for k, partition_id in enumerate(client_ids(info))
    ]


def listed(ids: Sequence[int], shown: int = 8) -> str:
    """Partition ids for a log line or an error, the first ``shown`` of them."""
    more = f", ... ({len(ids)} in all)" if len(ids) > shown else ""
    return ", ".join(map(str, ids[:shown])) + more


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
