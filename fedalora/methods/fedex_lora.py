"""FedEx-LoRA: FedIT's averaged factors plus the residual that makes the update exact.

Paper: Singhal, Ponkshe and Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated
and Efficient Fine-Tuning of Foundation Models", ACL 2025 (arXiv:2410.09432).

Rule, per adapted layer, with one rank r and scale s = s(r) for every client: clients
upload A_i (r x d_in) and B_i (d_out x r); the server sets A <- sum_i p_i A_i,
B <- sum_i p_i B_i and adds the error of that average to the residual,
R <- R + s (sum_i p_i B_i A_i - B A) (d_out x d_in, float64 sums), so that
W0 + R + s B A is exactly the weighted average of the clients' W0 + R + s B_i A_i.
The paper adds the residual into every client's frozen weight each round; here the
server keeps the cumulative R in the shared state and sends it whole, and each client
sets its frozen layer to W0 + R (``fedalora.methods.merged``, W0 stays the worker's
shared weight, quantised or not) and restarts its LoRA from A and B. A client that
missed rounds is therefore as exact as one that took every round (the paper samples
every client; sending increments instead would need each client to keep them all).
Round 1 starts from A = seeded Kaiming-uniform, B = 0 and no residual (R = 0 is not
sent). Ranks: one, as in the paper; a rank-heterogeneous extension would need a rule
for averaging factors of different ranks, which the paper does not give. Variants:
LoRA+ only (DoRA normalises the frozen weight, which the residual changes; a
principal init and LoRA-FA's frozen A would leave nothing to correct or a base each
client derives on its own). DP: refused (the residual is a product of the clients'
factors, not a sum of clipped updates). The exported adapter is R + s B A,
factorised exactly by SVD at full rank.
Up per client per layer: r (d_in + d_out) floats; down: r (d_in + d_out) + d_out d_in
from round 2 (the dense residual, as the paper sends it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..adapters import ClientAdapter, PeftFactors
from ..aggregation import lora_product_sum, modules_of, weighted_average
from ..models import BaseModel
from ..screening import product_size
from ..types import Arrays, tensor_of
from .base import Paper, Participant
from .lora_factors import FactorAveraging
from .merged import add_merged_updates, apply_merged_updates, merged_factors, merged_update
from .registry import register_method

#: The shared dense residual of each layer, ``<module>.residual`` (d_out x d_in).
RESIDUAL = "residual"


def exact_average(
    residual: Arrays, updates: Sequence[Arrays], num_examples: Sequence[float], scale: float
) -> dict[str, np.ndarray]:
    """FedEx-LoRA's rule: the averaged ``lora_A``/``lora_B`` and, per layer, the residual
    R + s (sum_i p_i B_i A_i - B A) (R: ``<module>.residual`` of ``residual``, zero
    where absent)."""
    averaged = weighted_average(updates, num_examples)
    result = dict(averaged)
    for module in modules_of(updates[0]):
        exact = lora_product_sum(updates, num_examples, [scale] * len(updates), module)
        product = averaged[f"{module}.lora_B"].astype(np.float64) @ averaged[
            f"{module}.lora_A"
        ].astype(np.float64)
        previous = residual.get(f"{module}.{RESIDUAL}")
        error = exact - scale * product
        if previous is not None:
            error += previous.astype(np.float64)
        result[f"{module}.{RESIDUAL}"] = error.astype(np.float32)
    return result


@register_method
class FedExLoRA(FactorAveraging):
    """FedIT's averages plus the exact residual, folded into every client's frozen
    weights."""

    name = "fedex-lora"
    paper = Paper(
        "Singhal, Ponkshe and Vepakomma",
        "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of "
        "Foundation Models",
        "ACL 2025",
        "2410.09432",
    )
    accepts = frozenset({"lora-plus-ratio"})
    nonlinear_reason = (
        "its residual is the error of a product of averaged factors, not a mean of "
        "clipped per-client updates"
    )
    uploads = downloads = ("lora_A", "lora_B")

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        scale = self.scaling.scale(clients[0].rank)
        return exact_average(shared, updates, [c.num_examples for c in clients], scale)

    def applied_size(self, upload: Arrays, rank: int) -> tuple[float, float]:
        """Of s B_i A_i: the product the exact aggregate averages."""
        return product_size(upload, self.scaling.scale(rank))

    def make_adapter(self, base: BaseModel, rank: int, dropout: float) -> ClientAdapter:
        adapter = super().make_adapter(base, rank, dropout)
        add_merged_updates(adapter)
        return adapter

    def install(self, adapter: ClientAdapter, arrays: Mapping[str, Any], shared_round: int) -> None:
        """A and B into the LoRA, the residual (when sent) as the merged update."""
        factors = {k: v for k, v in arrays.items() if tensor_of(k) != RESIDUAL}
        super().install(adapter, factors, shared_round)
        for m in adapter.targets:
            residual = arrays.get(f"{m}.{RESIDUAL}")
            if residual is not None:
                merged = merged_update(adapter, m)
                merged.copy_(torch.from_numpy(np.asarray(residual)).to(merged))

    def start_round(self, adapter: ClientAdapter) -> None:
        """This client's frozen layers become W0 + R."""
        apply_merged_updates(adapter)

    def export_factors(self, adapter: ClientAdapter) -> PeftFactors:
        """R + s B A as one exact full-rank factorisation."""
        return merged_factors(adapter)
