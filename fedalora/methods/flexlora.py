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

from collections.abc import Sequence

from ..aggregation import flexlora_factors, truncate_rank
from ..screening import product_size
from ..types import Arrays, LayerShapes
from .base import Method, Paper, Participant
from .lora_factors import initial_lora, padded_rank
from .registry import register_method


@register_method
class FlexLoRA(Method):
    """Weighted sum of full updates, SVD, per-client truncation."""

    name = "flexlora"
    accepts = frozenset({"lora-plus-ratio", "lora-fa"})
    paper = Paper(
        "Bai et al.",
        "Federated Fine-tuning of Large Language Models under "
        "Heterogeneous Tasks and Client Resources",
        "NeurIPS 2024",
        "2402.11505",
    )
    nonlinear_reason = (
        "its SVD of the summed products B_i A_i is not linear in the uploads; DP would "
        "have to clip and noise each dense d_out x d_in product"
    )
    heterogeneous = True
    uploads = downloads = ("lora_A", "lora_B")

    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        return initial_lora(layers, max(ranks), self.seed)

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        scales = [self.scaling.scale(c.rank) for c in clients]
        return flexlora_factors(
            updates, [c.num_examples for c in clients], scales, padded_rank(shared)
        )

    def applied_size(self, upload: Arrays, rank: int) -> tuple[float, float]:
        """Of s B_i A_i: the client's share of the summed product is what the SVD spreads."""
        return product_size(upload, self.scaling.scale(rank))

    def download(self, shared: Arrays, client: Participant) -> Arrays:
        return truncate_rank(shared, client.rank, 1.0 / self.scaling.scale(client.rank))
