"""RoLoRA: alternate rounds train and average only B or only A, so that every average
is exact.

Paper: Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization
of LoRA", NeurIPS 2025 (arXiv:2502.01755).

Rule, per adapted layer, one rank r for every client: in odd rounds every client
trains only B_i (d_out x r) with the global A frozen and uploads it, and the server
sets B <- sum_i p_i B_i (p_i = n_i / sum(n)); in even rounds the clients train only
A_i (r x d_in) with the global B frozen, and the server sets A <- sum_i p_i A_i. The
frozen factor is the same on every client, so sum_i p_i B_i A = B A exactly (and
likewise for A): the product of the averages is the average of the products. B
goes first, as in the authors' code (with B = 0 at the start, A's gradient is zero).
Round 1 starts from A = seeded Kaiming-uniform (one A for every client), B = 0; the
optimiser restarts every round, with the run's one learning rate for both factors.
Scaling: s from run-config ``scaling``, the same for every client; the server
averages factors and never needs s. The phase follows the server's round, so a
client sampled after missing rounds trains the factor of the round it is in. Ranks:
one (the frozen factor is shared). Variants: none (LoRA-FA freezes A for good; DoRA's
magnitude, LoRA+'s ratio and a principal init would need a phase of their own in the
alternation, which the paper does not give). DP: refused (the factor that changes
alternates with the round, and DP-FedAvg's step would put noise on the frozen one).
Up per client per layer: d_out r floats in odd rounds, r d_in in even ones (one factor,
as the paper sends); down: r (d_in + d_out), both factors (the paper's full
participation sends the new one only, but a client sampled after missing rounds needs
both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ..adapters import ClientAdapter
from ..aggregation import weighted_average
from ..types import Arrays, LayerShapes, Shapes
from .base import Paper, Participant
from .lora_factors import FactorAveraging
from .registry import register_method


def trained_factor(server_round: int) -> str:
    """The factor clients train and upload in ``server_round``: B in odd rounds, A in
    even ones."""
    return "lora_B" if server_round % 2 == 1 else "lora_A"


@register_method
class RoLoRA(FactorAveraging):
    """Alternating rounds over B and A; each average exact."""

    name = "rolora"
    paper = Paper(
        "Chen et al.",
        "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA",
        "NeurIPS 2025",
        "2502.01755",
    )
    accepts: ClassVar[frozenset[str]] = frozenset()
    nonlinear_reason = (
        "the factor it updates alternates with the round, and DP-FedAvg's step would add "
        "noise to the factor that every client kept frozen"
    )
    uploads = downloads = ("lora_A", "lora_B")

    def upload_shapes(self, layers: LayerShapes, rank: int, server_round: int) -> Shapes:
        shapes = super().upload_shapes(layers, rank, server_round)
        return {k: v for k, v in shapes.items() if k.endswith("." + trained_factor(server_round))}

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        """The factor the clients trained, averaged; the frozen one as it was."""
        return {**shared, **weighted_average(updates, [c.num_examples for c in clients])}

    def start_round(self, adapter: ClientAdapter) -> None:
        """Freeze the factor that this round does not train."""
        trained, tensors = trained_factor(adapter.server_round), adapter.tensors()
        for m in adapter.targets:
            for name in self.uploads:
                tensors[f"{m}.{name}"].requires_grad_(name == trained)

    def upload(self, adapter: ClientAdapter) -> Arrays:
        return adapter.arrays((trained_factor(adapter.server_round),))
