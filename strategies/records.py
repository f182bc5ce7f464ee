"""The run's records of a round: one ``metrics.jsonl`` row per client reply and one
``rounds.jsonl`` row per round (``fedalora.outputs`` writes them)."""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.supercore import log

from protocol import (
    ACCURACY,
    ARRAYS,
    LOSS,
    METRICS,
    NUM_EXAMPLES,
    SECONDS,
    UPLOAD_RANK,
    number,
    payload_bytes,
)

from .accounting import RoundTally
from .discovery import Node


def client_row(
    reply: Message, node: Node, server_round: int, phase: str, bytes_down: int
) -> dict[str, Any]:
    """A reply's metrics as a row: round, client, rank, phase, the reply metrics, any
    others the client sent, and the bytes each way."""
    metrics = reply.content.metric_records[METRICS]
    uploads = reply.content.array_records
    up = payload_bytes(uploads[ARRAYS]) if ARRAYS in uploads else 0
    extra = {
        k: number(metrics, k)
        for k in metrics
        if k not in (NUM_EXAMPLES, UPLOAD_RANK, LOSS, ACCURACY, SECONDS)
    }
    return {
        "round": server_round,
        "client": node.partition_id,
        "rank": int(number(metrics, UPLOAD_RANK)) if UPLOAD_RANK in metrics else node.rank,
        "phase": phase,
        "num_examples": int(number(metrics, NUM_EXAMPLES)),
        "loss": number(metrics, LOSS),
        "accuracy": number(metrics, ACCURACY),
        **extra,
        "bytes_up": up,
        "bytes_down": bytes_down,
        "seconds": number(metrics, SECONDS),
    }


def round_row(tally: RoundTally, skipped: bool, scores: Sequence[float]) -> dict[str, Any]:
    """The round's server-side record: attempts, faults, client scores, traffic, time."""
    return {
        "round": tally.server_round,
        "attempts": tally.attempts,
        "skipped": skipped,
        "failed": tally.failed,
        "rejected": tally.rejected,
        "mean_accuracy": float(np.mean(scores)) if scores else None,
        "worst_accuracy": float(np.min(scores)) if scores else None,
        "num_evaluated": len(scores),
        "bytes_up": tally.bytes_up,
        "bytes_down": tally.bytes_down,
        "aggregate_seconds": tally.aggregate_seconds,
        "seconds": tally.seconds,
    }


def log_round(row: dict[str, Any], num_rounds: int) -> None:
    log(
        INFO,
        "round %d/%d | mean acc %s | worst acc %s | up %.2f MB | down %.2f MB | "
        "aggregate %.3f s | round %.1f s",
        row["round"],
        num_rounds,
        _fmt(row["mean_accuracy"]),
        _fmt(row["worst_accuracy"]),
        row["bytes_up"] / 1e6,
        row["bytes_down"] / 1e6,
        row["aggregate_seconds"],
        row["seconds"],
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
