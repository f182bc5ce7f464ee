"""FedSA-LoRA: share and average A; B stays on each client (one rank for every client).

Paper: Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025 (arXiv:2410.01463).

Rule, per adapted layer: client i uploads A_i (r x d_in); the server sets
A <- sum_i p_i A_i (p_i = n_i / sum(n)) and broadcasts it; B_i (d_out x r) never
leaves client i. Round 1 starts from A = seeded Kaiming-uniform (B_i = 0 on each
client). Scaling: s from run-config ``scaling``, applied by the client only.
Up and down per client per layer: r d_in floats each way.
"""

from __future__ import annotations

from .base import Paper
from .lora_factors import FactorAveraging
from .registry import register_method


@register_method
class FedSALoRA(FactorAveraging):
    """FedAvg over the shared A matrices only."""

    name = "fedsa-lora"
    paper = Paper(
        "Guo et al.",
        "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
        "ICLR 2025",
        "2410.01463",
    )
    uploads = downloads = ("lora_A",)
    keeps = ("lora_B",)
