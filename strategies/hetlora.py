"""HetLoRA: zero-padding weighted by the norm of each client's update.

Paper: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024 (arXiv:2401.06432).

Rule, per adapted layer: client i uploads A_i (r_i x d_in) and B_i (d_out x r_i).
The server pads both to r_max with zeros and sets X <- sum_i w_i pad(X_i) over ALL
clients (a slot a client lacks counts as zero), with sparsity weights
w_i = ||s_i B_i A_i||_F / sum_j ||s_j B_j A_j||_F (computed from r x r Gram
matrices, never the d_out x d_in product). It broadcasts the padded factors; each
client truncates them to its rank. Round 1 starts from A = seeded Kaiming-uniform,
B = 0. Scaling: s_i = s(r_i) from run-config ``scaling``, used by the client and in
the server's norms alike.
Optional rank self-pruning (run-config ``rank-decay`` gamma < 1): after local
training a client compares ||s B[:, k:] A[k:]||_F, k = floor(gamma r_i), summed
over layers, with its value last round; if it fell, the client cuts its rank to k
and uploads at that rank from then on. ``rank-penalty`` lambda adds lambda times
that norm to the local loss, so that the tail fades (the paper's regulariser).
Up per client per layer: r_i (d_in + d_out) floats; down: r_max (d_in + d_out).
"""

from __future__ import annotations

from fedalora.aggregation import hetlora_average

from .common import Arrays, LoRAStrategy, NodeInfo, Shapes, initial_lora, lora_shapes


class HetLoRA(LoRAStrategy):
    """Zero-padding with norm-proportional weights; clients may prune their rank."""

    heterogeneous_ranks = True
    ranks_can_shrink = True

    def initial_shared(self) -> Arrays:
        self.padded_rank = self.max_rank
        return initial_lora(self.layer_shapes, self.padded_rank, self.config.seed)

    def upload_shapes(self, rank: int) -> Shapes:
        return lora_shapes(self.layer_shapes, rank)

    def aggregate(self, updates: list[Arrays], nodes: list[NodeInfo]) -> Arrays:
        return hetlora_average(updates, self.scales(nodes), self.padded_rank)
