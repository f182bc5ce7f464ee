"""Local training only: no federation, the reference for Delta_m%.

Each client trains its own LoRA (A and B, its own rank) and head on its own data
for the same rounds and steps as a federated run; nothing goes up or down. Its
per-client scores are the m_ref of Delta_m% in ../shared/design/algorithms.md.
Scaling: s(r_i) from run-config ``scaling``, on the client only.
Up and down per client per layer: 0 floats.
"""

from __future__ import annotations

from .common import Arrays, LoRAStrategy, NodeInfo, Shapes


class LocalOnly(LoRAStrategy):
    """Clients train alone; the server only schedules rounds and records metrics."""

    heterogeneous_ranks = True

    def initial_shared(self) -> Arrays:
        return {}

    def upload_shapes(self, rank: int) -> Shapes:
        return {}

    def aggregate(self, updates: list[Arrays], nodes: list[NodeInfo]) -> Arrays:
        return {}
