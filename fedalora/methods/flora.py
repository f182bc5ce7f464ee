"""FLoRA: stack the clients' LoRA factors so that the aggregate is exact.

Paper: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024 (arXiv:2409.05976).

Rule, per adapted layer: client i uploads A_i (r_i x d_in) and B_i (d_out x r_i).
The server stacks A = [A_1; ...; A_K] (R x d_in, R = sum r_i) and
B = [p_1 s_1 B_1, ..., p_K s_K B_K] (d_out x R), so B A = sum_i p_i s_i B_i A_i
exactly, and broadcasts both (``<module>.stack_A``, ``<module>.stack_B``). Every
client adds B A to its private merged update, once per aggregated round, computes
W0 x + merged x (W0 stays the worker's shared weight, quantised or not) and starts a
fresh LoRA (seeded A, B = 0) every round. Scaling: s_i = s(r_i) from
run-config ``scaling``, applied by the client in training and folded into the stack
by the server. The exported adapter is the merged update plus the current LoRA,
factorised exactly by SVD at full rank.
Up per client per layer: r_i (d_in + d_out) floats; down: R (d_in + d_out), which
grows with the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..adapters import ClientAdapter, PeftFactors
from ..aggregation import flora_stack
from ..models import BaseModel
from ..screening import product_size
from ..types import Arrays, LayerShapes
from .base import Method, Paper, Participant
from .merged import add_merged_updates, apply_merged_updates, merged_factors, merged_update
from .registry import register_method

#: Client bookkeeping: the round whose stack was merged last.
MERGED_ROUND = "merged-round"


@register_method
class FLoRA(Method):
    """Exact aggregation by stacking; clients merge the stack into their weights."""

    name = "flora"
    accepts = frozenset({"lora-plus-ratio"})
    paper = Paper(
        "Wang et al.",
        "FLoRA: Federated Fine-Tuning Large Language Models with "
        "Heterogeneous Low-Rank Adaptations",
        "NeurIPS 2024",
        "2409.05976",
    )
    nonlinear_reason = (
        "its stacked factors publish every client's own A_i and B_i, which no noise "
        "on a sum can cover; DP would have to clip and noise each dense product"
    )
    heterogeneous = True
    uploads = ("lora_A", "lora_B")

    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        return {}  # nothing to merge before the first aggregation

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        scales = [self.scaling.scale(c.rank) for c in clients]
        return flora_stack(updates, [c.num_examples for c in clients], scales)

    def applied_size(self, upload: Arrays, rank: int) -> tuple[float, float]:
        """Of s B_i A_i: what the stack adds to every client's frozen weights."""
        return product_size(upload, self.scaling.scale(rank))

    def make_adapter(self, base: BaseModel, rank: int, dropout: float) -> ClientAdapter:
        adapter = super().make_adapter(base, rank, dropout)
        add_merged_updates(adapter)
        adapter.state[MERGED_ROUND] = torch.zeros(1, dtype=torch.int64)
        return adapter

    def install(self, adapter: ClientAdapter, arrays: Mapping[str, Any], shared_round: int) -> None:
        """Add the stacked update B A of ``shared_round`` to the merged update, once."""
        done = int(adapter.state[MERGED_ROUND])
        if not arrays or shared_round <= done:
            return
        if shared_round != done + 1:
            raise ValueError(
                f"this client merged the update of round {done} but was sent "
                f"round {shared_round}'s; FLoRA clients cannot skip a merge"
            )
        for m in adapter.targets:
            stack_a = torch.from_numpy(np.asarray(arrays[f"{m}.stack_A"]))
            stack_b = torch.from_numpy(np.asarray(arrays[f"{m}.stack_B"]))
            merged = merged_update(adapter, m)
            merged += (stack_b.double() @ stack_a.double()).to(merged)
        adapter.state[MERGED_ROUND].fill_(shared_round)

    def start_round(self, adapter: ClientAdapter) -> None:
        """This client's frozen layers become W0 + merged update; the LoRA is fresh."""
        apply_merged_updates(adapter)

    def export_factors(self, adapter: ClientAdapter) -> PeftFactors:
        """Merged update + current LoRA as one exact full-rank factorisation."""
        return merged_factors(adapter)
