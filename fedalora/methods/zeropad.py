"""Zero-padding: FedIT for heterogeneous ranks.

Paper: the ZeroPadding baseline of Ban and Ji, "Rethinking Parameter Sharing for LLM
Fine-Tuning with Multiple LoRAs", arXiv preprint (arXiv:2509.25414), with the padding
scheme of Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024 (arXiv:2401.06432), and FedAvg weights.

Rule, per adapted layer: client i uploads A_i (r_i x d_in) and B_i (d_out x r_i).
The server pads both to r_max with zeros and averages each rank slot j (row j of
A, column j of B) over the clients that have it (r_i > j), their weights p_i
renormalised over those clients; a slot held by one client is its value. The
server broadcasts the padded r_max factors (the paper counts r_max down), and each
client takes their first r_i rows of A and columns of B. Round 1 starts from
A = seeded Kaiming-uniform, B = 0. Scaling: each client applies s(r_i) from
run-config ``scaling`` to the factors it takes; the server averages factors and does
not use s (with ``constant`` scaling, the default, every client's s is the same).
Up per client per layer: r_i (d_in + d_out) floats; down: r_max (d_in + d_out).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..adapters import ClientAdapter
from ..aggregation import truncate_rank, zero_pad_average
from ..types import Arrays, LayerShapes
from .base import Method, Paper, Participant
from .lora_factors import initial_lora, padded_rank
from .registry import register_method


@register_method
class ZeroPadding(Method):
    """Zero-padded FedIT, slots averaged over the clients that hold them."""

    name = "zeropad"
    accepts = frozenset({"lora-plus-ratio", "lora-fa"})
    paper = Paper(
        "Ban and Ji (the ZeroPadding baseline)",
        "Rethinking Parameter Sharing for LLM Fine-Tuning with Multiple LoRAs",
        "arXiv preprint",
        "2509.25414",
    )
    heterogeneous = True
    nonlinear_reason: ClassVar[str | None] = None
    uploads = downloads = ("lora_A", "lora_B")

    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        return initial_lora(layers, max(ranks), self.seed)

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        return zero_pad_average(
            updates, [c.num_examples for c in clients], padded_rank(shared), slots="holders"
        )

    def install(self, adapter: ClientAdapter, arrays: Mapping[str, Any], shared_round: int) -> None:
        """Take the first r_i rows of A and columns of B of the padded factors."""
        adapter.copy_in(truncate_rank(arrays, adapter.rank), self.downloads)
