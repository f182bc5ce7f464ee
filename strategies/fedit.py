"""FedIT: FedAvg over both LoRA factors (homogeneous ranks).

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

from fedalora.aggregation import weighted_average

from .common import Arrays, LoRAStrategy, NodeInfo, Shapes, initial_lora, lora_shapes


class FedIT(LoRAStrategy):
    """FedAvg over A and B."""

    def initial_shared(self) -> Arrays:
        return initial_lora(self.layer_shapes, self.max_rank, self.config.seed)

    def upload_shapes(self, rank: int) -> Shapes:
        return lora_shapes(self.layer_shapes, rank)

    def aggregate(self, updates: list[Arrays], nodes: list[NodeInfo]) -> Arrays:
        return weighted_average(updates, [n.num_examples for n in nodes])
