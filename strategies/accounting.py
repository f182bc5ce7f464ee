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
    failed: int = 0  # error replies and missing replies, both phases
    rejected: int = 0  # updates screened out
    sent: dict[int, int] = field(default_factory=dict)  # node id -> bytes of its last message
    local_model_scores: list[float] = field(default_factory=list)  # this attempt's
    awaiting: set[int] = field(default_factory=set)  # node ids sent to in the current phase
    messages: list[Message] = field(default_factory=list)  # the current phase's messages

    def send(self, node_id: int, record: ArrayRecord) -> None:
        """Count a message's arrays going down to ``node_id``."""
        self.sent[node_id] = payload_bytes(record)
        self.bytes_down += self.sent[node_id]

    def receive(self, record: ArrayRecord) -> int:
        """Count an upload's arrays; returns its bytes."""
        size = payload_bytes(record)
        self.bytes_up += size
        return size

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started
