"""The run's records of a round: ``metrics.jsonl`` rows per client reply and one
``rounds.jsonl`` row per round (``fedalora.outputs`` writes them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.supercore import log

from fedalora.outputs import EVALUATE, LOCAL_MODEL, TRAIN, progress_line, protocol_scores

from .accounting import RoundTally
from .discovery import Node
from .protocol import (
    ACCURACY,
    LOSS,
    NUM_EXAMPLES,
    SECONDS,
    UPLOAD_RANK,
    payload_bytes,
    split_local_model,
)

_ROW_METRICS = (NUM_EXAMPLES, UPLOAD_RANK, LOSS, ACCURACY, SECONDS)


def client_rows(
    metrics: MetricRecord,
    upload: ArrayRecord | None,
    node: Node,
    server_round: int,
    phase: str,
    bytes_down: int,
) -> list[dict[str, Any]]:
    """A client's rows from its part of a reply: its own metrics in ``phase`` with the
    bytes each way, and for a train reply the local-model scores it carries (phase
    ``local-model``, no bytes)."""
    own, local_model = split_local_model(metrics)
    up = payload_bytes(upload) if upload is not None else 0
    rows = [_row(own, node, server_round, phase, up, bytes_down)]
    if phase == TRAIN and local_model:
        rows.append(
            _row(
                {**local_model, UPLOAD_RANK: rows[0]["rank"]}, node, server_round, LOCAL_MODEL, 0, 0
            )
        )
    return rows


def round_row(
    tally: RoundTally,
    skipped: bool,
    local_model: Sequence[float],
    evaluated: Sequence[float],
    metric: str = ACCURACY,
) -> dict[str, Any]:
    """The round's server-side record: attempts, faults, the clients' ``metric`` under
    both protocols (``local_model_*``: each trained client's local model, the paper's;
    ``evaluate_*``: the evaluated clients after aggregation), traffic and time."""
    return {
        "round": tally.server_round,
        "attempts": tally.attempts,
        "skipped": skipped,
        "failed": tally.failed,
        "rejected": tally.rejected,
        "metric": metric,
        **protocol_scores(LOCAL_MODEL, local_model, metric),
        **protocol_scores(EVALUATE, evaluated, metric),
        "bytes_up": tally.bytes_up,
        "bytes_down": tally.bytes_down,
        "aggregate_seconds": tally.aggregate_seconds,
        "seconds": tally.seconds,
    }


def log_round(row: Mapping[str, Any], num_rounds: int) -> None:
    log(INFO, "%s", progress_line(row, num_rounds))


def _row(
    metrics: Mapping[str, float], node: Node, server_round: int, phase: str, up: int, down: int
) -> dict[str, Any]:
    extra = {k: v for k, v in metrics.items() if k not in _ROW_METRICS}
    return {
        "round": server_round,
        "client": node.partition_id,
        "rank": int(metrics.get(UPLOAD_RANK, node.rank)),
        "phase": phase,
        "num_examples": int(metrics[NUM_EXAMPLES]),
        "loss": metrics[LOSS],
        "accuracy": metrics[ACCURACY],
        **extra,
        "bytes_up": up,
        "bytes_down": down,
        "seconds": metrics[SECONDS],
    }
