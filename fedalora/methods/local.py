"""Local training only: no federation, the reference of Delta_m%.

Each client trains its own LoRA (A and B at its own rank) and head on its own data
for the same rounds and steps as a federated run; nothing goes up or down. Its
per-client scores are the m_ref of Delta_m% = (1/K) sum_i (m_ref,i - m_i) / m_ref,i.
Scaling: s(r_i) from run-config ``scaling``, on the client only.
Up and down per client per layer: 0 floats.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..types import Arrays, LayerShapes
from .base import Method, Participant
from .registry import register_method


@register_method
class LocalOnly(Method):
    """Clients train alone; the server only schedules rounds and records metrics."""

    name = "local"
    accepts = frozenset({"dora", "lora-plus-ratio", "lora-init", "lora-fa"})
    paper = None
    nonlinear_reason = "it shares nothing, so there is no update to protect"
    heterogeneous = True
    keeps = ("lora_A", "lora_B")

    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        return {}

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        return {}
