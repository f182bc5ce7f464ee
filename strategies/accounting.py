"""Communication and timing of the round in progress, over all its attempts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message

from .protocol import payload_bytes


@dataclass
class RoundTally:
    """What round ``server_round`` has cost so far: attempts, bytes each way (array
    payload), the aggregation's seconds, failed and rejected replies; and the scores of
    the local models that the latest attempt's clients trained."""

    server_round: int = 0
    started: float = field(default_factory=time.perf_counter)
    attempts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    aggregate_seconds: float = 0.0
    failed: int = 0  # clients whose reply failed or was missing, both phases
    rejected: int = 0  # updates screened out
    sent: dict[int, int] = field(default_factory=dict)  # client -> bytes of its last download
    local_model_scores: list[float] = field(default_factory=list)  # this attempt's
    #: node id -> the clients (partition ids) it was asked for in the current phase
    awaiting: dict[int, list[int]] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)  # the current phase's messages

    def send(self, partition_id: int, record: ArrayRecord) -> None:
        """Count a client's arrays going down to it."""
        self.sent[partition_id] = payload_bytes(record)
        self.bytes_down += self.sent[partition_id]

    def receive(self, record: ArrayRecord) -> int:
        """Count an upload's arrays; returns its bytes."""
        size = payload_bytes(record)
        self.bytes_up += size
        return size

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started
