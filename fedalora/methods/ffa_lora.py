"""FFA-LoRA: A frozen at a shared random init, only B trained and averaged.

Paper: Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024 (arXiv:2403.12313).

Rule, per adapted layer: every party regenerates the same A (r_max x d_in) from the
run seed (``seeded_lora_a``); client i uses its first r_i rows, frozen. Client i
uploads B_i (d_out x r_i); the server zero-pads to r_max and sets
B <- sum_i p_i pad(B_i) (p_i = n_i / sum(n), a slot a client lacks counts as zero),
so B A = sum_i p_i B_i A[:r_i] exactly, and sends client i the first r_i columns of
B. Scaling: s from run-config ``scaling``; exactness of the aggregate in DeltaW needs
equal s_i (``constant``, the default, or one rank).
Up and down per client per layer: d_out r_i floats each way.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..adapters import ClientAdapter
from ..aggregation import truncate_rank, zero_pad_average
from ..models import BaseModel
from ..types import Arrays, LayerShapes
from .base import Method, Paper, Participant
from .lora_factors import freeze_seeded_a, initial_lora, padded_rank
from .registry import register_method


@register_method
class FFALoRA(Method):
    """Frozen shared A; B averaged over all clients, zero-padded."""

    name = "ffa-lora"
    paper = Paper(
        "Sun et al.",
        "Improving LoRA in Privacy-preserving Federated Learning",
        "ICLR 2024",
        "2403.12313",
    )
    heterogeneous = True
    nonlinear_reason = None
    uploads = downloads = ("lora_B",)

    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        return initial_lora(layers, max(ranks), self.seed, self.downloads)  # B = 0

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        return zero_pad_average(
            updates, [c.num_examples for c in clients], padded_rank(shared), slots="all"
        )

    def download(self, shared: Arrays, client: Participant) -> Arrays:
        return truncate_rank(shared, client.rank)

    def make_adapter(self, base: BaseModel, rank: int, dropout: float) -> ClientAdapter:
        """PEFT LoRA whose A is the shared seeded A's first ``rank`` rows, frozen."""
        return freeze_seeded_a(super().make_adapter(base, rank, dropout), self.seed)
