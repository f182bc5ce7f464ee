"""FLoRA: stack the clients' LoRA factors so that the aggregate is exact.

Paper: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024 (arXiv:2409.05976).

Rule, per adapted layer: client i uploads A_i (r_i x d_in) and B_i (d_out x r_i).
The server stacks A = [A_1; ...; A_K] (R x d_in, R = sum r_i) and
B = [p_1 s_1 B_1, ..., p_K s_K B_K] (d_out x R), so B A = sum_i p_i s_i B_i A_i
exactly, and broadcasts both. Every client adds B A to its frozen weight (once per
aggregated round) and starts a fresh LoRA (seeded A, B = 0) every round. Scaling:
s_i = s(r_i) from run-config ``scaling``, applied by the client in training and
folded into the stack by the server.
Up per client per layer: r_i (d_in + d_out) floats; down: R (d_in + d_out), which
grows with the number of clients.
"""

from __future__ import annotations

from fedalora.aggregation import flora_stack

from .common import Arrays, LoRAStrategy, NodeInfo, Shapes, lora_shapes


class FLoRA(LoRAStrategy):
    """Exact aggregation by stacking; clients merge the stack into their weights."""

    heterogeneous_ranks = True

    def initial_shared(self) -> Arrays:
        return {}  # nothing to merge before the first aggregation

    def upload_shapes(self, rank: int) -> Shapes:
        return lora_shapes(self.layer_shapes, rank)

    def aggregate(self, updates: list[Arrays], nodes: list[NodeInfo]) -> Arrays:
        return flora_stack(updates, [n.num_examples for n in nodes], self.scales(nodes))
