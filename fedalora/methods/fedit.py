"""FedIT: FedAvg over both LoRA factors (one rank for every client).

Paper: Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning", ICASSP 2024 (arXiv:2305.05644).

Rule, per adapted layer: clients upload A_i (r x d_in) and B_i (d_out x r); the
server sets A <- sum_i p_i A_i and B <- sum_i p_i B_i (p_i = n_i / sum(n)) and
broadcasts both. Inexact: (sum p_i B_i)(sum p_i A_i) != sum p_i B_i A_i when the
clients differ. Round 1 starts from A = seeded Kaiming-uniform, B = 0. Scaling:
s from run-config ``scaling``, the same for every client (one rank); the server
averages factors and never needs s.
Up and down per client per layer: r (d_in + d_out) floats each way.
"""

from __future__ import annotations

from .base import Paper
from .lora_factors import FactorAveraging
from .registry import register_method


@register_method
class FedIT(FactorAveraging):
    """FedAvg over A and B."""

    name = "fedit"
    paper = Paper(
        "Zhang et al.",
        "Towards Building the Federated GPT: Federated Instruction Tuning",
        "ICASSP 2024",
        "2305.05644",
    )
    uploads = downloads = ("lora_A", "lora_B")
