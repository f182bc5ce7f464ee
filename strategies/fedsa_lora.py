"""FedSA-LoRA: share and average A; B stays on each client (homogeneous ranks).

Paper: Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025 (arXiv:2410.01463).

Rule, per adapted layer: client i uploads A_i (r x d_in); the server sets
A <- sum_i p_i A_i (p_i = n_i / sum(n)) and broadcasts it; B_i (d_out x r) never
leaves client i. Round 1 starts from A = seeded Kaiming-uniform (B_i = 0 on each
client). Scaling: s from run-config ``scaling``, applied by the client only.
Up and down per client per layer: r d_in floats each way.
"""

from __future__ import annotations

from fedalora.aggregation import weighted_average
from fedalora.sharing import A

from .common import Arrays, LoRAStrategy, NodeInfo, Shapes, initial_lora, lora_shapes


class FedSALoRA(LoRAStrategy):
    """FedAvg over the shared A matrices only."""

    def initial_shared(self) -> Arrays:
        return initial_lora(self.layer_shapes, self.max_rank, self.config.seed, (A,))

    def upload_shapes(self, rank: int) -> Shapes:
        return lora_shapes(self.layer_shapes, rank, (A,))

    def aggregate(self, updates: list[Arrays], nodes: list[NodeInfo]) -> Arrays:
        return weighted_average(updates, [n.num_examples for n in nodes])
