"""FlexLoRA: aggregate full-size updates, give each client its best rank-r_i share.

Paper: Bai et al., "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024 (arXiv:2402.11505).

Rule, per adapted layer: client i uploads A_i (r_i x d_in) and B_i (d_out x r_i).
The server forms DeltaW = sum_i p_i s_i B_i A_i (dense d_out x d_in, p_i =
n_i / sum(n)) and its SVD U S V^T, and keeps U S and V^T to r_max. Client i
receives B_i = U[:, :r_i] S[:r_i] / s_i and A_i = V^T[:r_i], so s_i B_i A_i is the
best rank-r_i approximation of DeltaW. Round 1 starts from A = seeded
Kaiming-uniform, B = 0. Scaling: s_i = s(r_i) from run-config ``scaling``, applied
by the client and undone/redone identically by the server.
Up and down per client per layer: r_i (d_in + d_out) floats each way; the server
holds one dense matrix and runs one SVD per layer.
"""

from __future__ import annotations

from fedalora.aggregation import flexlora_factors, truncate_rank

from .common import Arrays, LoRAStrategy, NodeInfo, Shapes, initial_lora, lora_shapes


class FlexLoRA(LoRAStrategy):
    """Weighted sum of full updates, SVD, per-client truncation."""

    heterogeneous_ranks = True

    def initial_shared(self) -> Arrays:
        return initial_lora(self.layer_shapes, self.max_rank, self.config.seed)

    def upload_shapes(self, rank: int) -> Shapes:
        return lora_shapes(self.layer_shapes, rank)

    def aggregate(self, updates: list[Arrays], nodes: list[NodeInfo]) -> Arrays:
        return flexlora_factors(updates, [n.num_examples for n in nodes], self.scales(nodes),
                                self.max_rank)

    def download(self, node: NodeInfo) -> Arrays:
        return truncate_rank(self.shared, node.rank, 1.0 / self.config.scale(node.rank))
