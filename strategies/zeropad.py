"""Zero-padding: FedIT for heterogeneous ranks.

Paper: the ZeroPadding baseline of Fed-ALoRA (../shared/design/algorithms.md);
the padding scheme of Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models", EMNLP 2024, with FedAvg weights.

Rule, per adapted layer: client i uploads A_i (r_i x d_in) and B_i (d_out x r_i).
The server pads both to r_max with zeros and averages each rank slot j (row j of
A, column j of B) over the clients that have it (r_i > j), their weights p_i
renormalised over those clients; a slot held by one client is its value. The
server broadcasts the padded r_max factors; each client takes the first r_i rows
of A and columns of B. Round 1 starts from A = seeded Kaiming-uniform, B = 0.
Scaling: each client applies s(r_i) from run-config ``scaling`` to the factors it
takes; the server averages factors and does not use s (with ``constant`` scaling,
the default, every client's s is the same).
Up per client per layer: r_i (d_in + d_out) floats; down: r_max (d_in + d_out).
"""

from __future__ import annotations

from fedalora.aggregation import zero_pad_average

from .common import Arrays, LoRAStrategy, NodeInfo, Shapes, initial_lora, lora_shapes


class ZeroPadding(LoRAStrategy):
    """Zero-padded FedIT, slots averaged over the clients that hold them."""

    heterogeneous_ranks = True

    def initial_shared(self) -> Arrays:
        return initial_lora(self.layer_shapes, self.max_rank, self.config.seed)

    def upload_shapes(self, rank: int) -> Shapes:
        return lora_shapes(self.layer_shapes, rank)

    def aggregate(self, updates: list[Arrays], nodes: list[NodeInfo]) -> Arrays:
        return zero_pad_average(updates, [n.num_examples for n in nodes], self.max_rank,
                                slots="holders")
