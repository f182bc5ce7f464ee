"""Fed-ALoRA with homogeneous ranks: share and average B only; A stays on each client.

Paper: "Fed-ALoRA: asymmetric sharing of LoRA for federated fine-tuning" (the
asymmetric-sharing rule of ../shared/design/algorithms.md).

Rule, per adapted layer: each client uploads its trained B_i (d_out x r); the
server sets B <- sum_i p_i B_i with p_i = n_i / sum(n) and broadcasts B. A_i
(r x d_in) never leaves client i. Scaling: s = run-config ``scaling`` of the
(common) rank, applied by the client only; the server never needs it.
Up and down per client per layer: d_out * r floats each way.
"""

from __future__ import annotations

from fedalora.aggregation import weighted_average
from fedalora.sharing import B

from .common import Arrays, LoRAStrategy, NodeInfo, Shapes, initial_lora, lora_shapes


class FedALoRA(LoRAStrategy):
    """Homogeneous Fed-ALoRA: FedAvg over the shared B matrices only."""

    def initial_shared(self) -> Arrays:
        return initial_lora(self.layer_shapes, self.max_rank, self.config.seed, (B,))  # B = 0

    def upload_shapes(self, rank: int) -> Shapes:
        return lora_shapes(self.layer_shapes, rank, (B,))

    def aggregate(self, updates: list[Arrays], nodes: list[NodeInfo]) -> Arrays:
        return weighted_average(updates, [n.num_examples for n in nodes])
