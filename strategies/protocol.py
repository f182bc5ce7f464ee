"""The messages between the ServerApp and the ClientApps: record keys, config keys,
metric names, array conversion and byte counting, in one place for both sides.

A node hosts one client or a cohort of them (``partition-ids``), and one message to a
node speaks for all of its clients sampled in the round. A train or evaluate message
carries ``config`` (``clients``: the sampled clients' partition ids, ``server-round``,
``shared-round``: the round whose aggregation produced the arrays, ``final-round`` and
``run-name``) and, per sampled client p, ``arrays.p`` (what the method sends it). A
reply carries per client ``metrics.p`` (``REPLY_METRICS`` and any others, one spelling:
snake_case, as in ``metrics.jsonl``) and, from training, ``arrays.p`` (the upload); a
train reply's metrics also score the client's local model right after training
(``LOCAL_MODEL_PREFIX``). The discovery query's reply is a ``config`` record of
``clients`` (the hosted clients' partition ids) and, in the same order, their ``rank``,
``num-examples`` and ``num-test-examples``; and ``metric`` (the score clients are ranked
by), ``head`` (the modules of the local head they train) and ``labels`` (class names in
label-id order; the last two only when there are any); from a node whose configuration,
model or data cannot work, of ``error-key`` and ``error`` (the run-config key and the
problem with its fix); from a node that failed otherwise, of ``error`` alone (the
exception's type and message) and ``clients`` when the node knows them. A ClientApp
that fails in training or evaluation answers with an error reply whose reason is the
exception's type and message: every client of the message failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID

from fedalora.types import Arrays

#: Record keys, both directions.
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
#: Keys of a train or evaluate message's config record (``CLIENTS`` also of the query reply).
CLIENTS = "clients"
SERVER_ROUND, SHARED_ROUND, FINAL_ROUND, RUN_NAME = (
    "server-round",
    "shared-round",
    "final-round",
    "run-name",
)
#: Keys of the discovery reply (per hosted client: rank and examples; what they score).
RANK, NUM_TRAIN_EXAMPLES = "rank", "num-examples"
NUM_TEST_EXAMPLES, METRIC, HEAD, LABELS = "num-test-examples", "metric", "head", "labels"
#: Keys of a discovery reply from a node that cannot take part (its ConfigError).
ERROR_KEY, ERROR = "error-key", "error"
#: Metrics of every train and evaluate reply.
NUM_EXAMPLES, LOSS, ACCURACY, SECONDS = "num_examples", "loss", "accuracy", "seconds"
REPLY_METRICS = (NUM_EXAMPLES, LOSS, ACCURACY, SECONDS)
#: Train-reply metrics: the rank of the upload, and the round of the private state the
#: client started from (0: a fresh start).
UPLOAD_RANK, PRIVATE_STATE_ROUND = "rank", "private_state_round"
#: The prefix of a train reply's scores of the client's local model right after
#: training (the paper's evaluation protocol).
LOCAL_MODEL_PREFIX = "local_model."


def keyed(kind: str, partition_id: int) -> str:
    """The record key of client ``partition_id``'s ``kind`` (``ARRAYS``, ``METRICS``)."""
    return f"{kind}.{partition_id}"


def client_ids(config: ConfigRecord) -> list[int]:
    """The partition ids a message's or query reply's ``config`` names."""
    value = config[CLIENTS]
    ids = value if isinstance(value, list) else [value]
    return [int(p) for p in ids]


def reply_sender(reply: Message, destinations: Mapping[str, int]) -> int:
    """The node a reply concerns. The SuperLink answers for a node that died or whose
    reply expired with an error reply of its own (source node 1); ``destinations`` (sent
    message id -> node id) attributes it to the node that was asked."""
    source = reply.metadata.src_node_id
    if source == SUPERLINK_NODE_ID:
        return destinations.get(reply.metadata.reply_to_message_id, source)
    return source


def destinations(messages: Iterable[Message]) -> dict[str, int]:
    """Sent message id -> destination node id (ids exist once the grid pushed them)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def to_numpy(record: ArrayRecord) -> Arrays:
    return {key: array.numpy() for key, array in record.items()}


def to_metrics(
    metrics: Mapping[str, float], local_model: Mapping[str, float] | None = None
) -> MetricRecord:
    """A client's metrics, and a train reply's local-model scores, as a MetricRecord
    (example counts as ints, the rest as floats)."""
    merged = {**metrics, **{LOCAL_MODEL_PREFIX + k: v for k, v in (local_model or {}).items()}}
    return MetricRecord(
        {
            key: int(value) if key.endswith(NUM_EXAMPLES) else float(value)
            for key, value in merged.items()
        }
    )


def split_local_model(metrics: MetricRecord) -> tuple[dict[str, float], dict[str, float]]:
    """A reply's metrics as floats: (its own, the local-model scores it carries)."""
    own, local = {}, {}
    for key in metrics:
        if key.startswith(LOCAL_MODEL_PREFIX):
            local[key[len(LOCAL_MODEL_PREFIX) :]] = number(metrics, key)
        else:
            own[key] = number(metrics, key)
    return own, local


def number(record: ConfigRecord | MetricRecord, key: str) -> float:
    """A record's numeric value ``key`` as a float; TypeError if it is not a number."""
    value = record[key]
    if not isinstance(value, int | float):
        raise TypeError(f"'{key}' is {type(value).__name__}, expected a number")
    return float(value)


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data in a record (element count x element size, no headers),
    read from each Array's shape and dtype without deserialising the data."""
    return int(
        sum(
            np.prod(array.shape, dtype=np.int64) * np.dtype(array.dtype).itemsize
            for array in record.values()
        )
    )
