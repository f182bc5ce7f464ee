"""FFA-LoRA: A frozen at a shared random init, only B trained and averaged.

Paper: Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024 (arXiv:2403.12313).

Rule, per adapted layer: every party regenerates the same A (r_max x d_in) from
the run seed (``fedalora.sharing.seeded_lora_a``); client i uses its first r_i rows,
frozen. Client i uploads B_i (d_out x r_i); the server zero-pads to r_max and sets
B <- sum_i p_i pad(B_i) (p_i = n_i / sum(n), a slot a client lacks counts as
zero), so B A = sum_i p_i B_i A[:r_i] exactly. Client i downloads the first r_i
columns of B. Scaling: s from run-config ``scaling``; exactness of the aggregate
in DeltaW needs equal s_i (``constant``, the default, or one rank).
Up and down per client per layer: d_out r_i floats each way.
"""

from __future__ import annotations

from fedalora.aggregation import truncate_rank, zero_pad_average
from fedalora.sharing import B

from .common import Arrays, LoRAStrategy, NodeInfo, Shapes, initial_lora, lora_shapes


class FFALoRA(LoRAStrategy):
    """Frozen shared A; B averaged over all clients, zero-padded."""

    heterogeneous_ranks = True

    def initial_shared(self) -> Arrays:
        return initial_lora(self.layer_shapes, self.max_rank, self.config.seed, (B,))  # B = 0

    def upload_shapes(self, rank: int) -> Shapes:
        return lora_shapes(self.layer_shapes, rank, (B,))

    def aggregate(self, updates: list[Arrays], nodes: list[NodeInfo]) -> Arrays:
        return zero_pad_average(updates, [n.num_examples for n in nodes], self.max_rank,
                                slots="all")

    def download(self, node: NodeInfo) -> Arrays:
        return truncate_rank(self.shared, node.rank)
