"""Fed-ALoRA with heterogeneous ranks: reconcile ranks through a shared dimension d_m.

Paper: "Fed-ALoRA: asymmetric sharing of LoRA for federated fine-tuning"
(the rank-reconciling decomposition of ../shared/design/algorithms.md).

Client i's update is DeltaW_i = s (B0 + B2_i B1_i) M_i A_i. The client uploads
B2_i (d_out x r_i) and B1_i (r_i x d_m); A_i and M_i never leave it. The server
accumulates B0 <- B0 + sum_i p_i B2_i B1_i (p_i = n_i / sum(n)) and broadcasts B0
(d_out x d_m). No padding, truncation or SVD. Scaling: s from run-config
``scaling`` at the client's own rank, applied by the client only.
Up per client per layer: d_out r_i + r_i d_m floats; down: d_out d_m.
"""

from __future__ import annotations

import numpy as np

from fedalora.aggregation import accumulate_decomposed

from .common import Arrays, LoRAStrategy, NodeInfo, Shapes


class FedALoRAHetero(LoRAStrategy):
    """Heterogeneous Fed-ALoRA: the server accumulates B2_i B1_i into the shared B0."""

    heterogeneous_ranks = True

    def initial_shared(self) -> Arrays:
        d_m = self.config.intermediate_rank
        return {f"{m}.B0": np.zeros((d_out, d_m), np.float32)
                for m, (d_out, _) in self.layer_shapes.items()}

    def upload_shapes(self, rank: int) -> Shapes:
        d_m = self.config.intermediate_rank
        shapes: Shapes = {}
        for m, (d_out, _) in self.layer_shapes.items():
            shapes[f"{m}.B2"], shapes[f"{m}.B1"] = (d_out, rank), (rank, d_m)
        return shapes

    def aggregate(self, updates: list[Arrays], nodes: list[NodeInfo]) -> Arrays:
        return accumulate_decomposed(self.shared, updates, [n.num_examples for n in nodes])
