"""A method with server-side state: FedAvg of B with server momentum (FedAvgM; Hsu, Qi
and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", arXiv:1909.06335).

Clients keep A private and upload B_i at their own rank; with the padded weighted mean
m = sum_i p_i pad(B_i), the server keeps a velocity v (never sent, checkpointed) and
sets v <- beta v + (m - B), B <- B + v. Run it with
``--run-config "strategy='tests.momentum_method:MomentumBLoRA'"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedalora.aggregation import truncate_rank, zero_pad_average
from fedalora.errors import require
from fedalora.methods import Method, MethodOptions, Participant, register_method
from fedalora.methods.lora_factors import initial_lora, padded_rank
from fedalora.types import Arrays, LayerShapes


def momentum_step(
    shared: Arrays, velocity: Arrays, mean: Arrays, momentum: float
) -> tuple[Arrays, Arrays]:
    """(B + v', v') with v' = momentum v + (mean - B), entry by entry."""
    moved = {k: momentum * velocity[k] + (mean[k] - shared[k]) for k in shared}
    return {k: shared[k] + moved[k] for k in shared}, moved


@dataclass(frozen=True)
class MomentumOptions(MethodOptions):
    server_momentum: float = field(default=0.9, metadata={"help": "beta of the velocity"})

    def validate(self) -> None:
        require(0.0 <= self.server_momentum < 1.0, "server-momentum", "must be in [0, 1)")


@register_method
class MomentumBLoRA(Method):
    """B averaged over clients (zero-padded), applied through a server momentum."""

    name = "momentum-b"
    paper = None
    heterogeneous = True
    Options = MomentumOptions
    options: MomentumOptions
    uploads = downloads = ("lora_B",)
    keeps = ("lora_A",)

    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        return initial_lora(layers, max(ranks), self.seed, self.downloads)  # B = 0

    def initial_server_state(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        return {k: np.zeros_like(v) for k, v in self.initial_shared(layers, ranks).items()}

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        return zero_pad_average(
            updates, [c.num_examples for c in clients], padded_rank(shared), slots="all"
        )

    def server_step(
        self,
        shared: Arrays,
        server_state: Arrays,
        updates: Sequence[Arrays],
        clients: Sequence[Participant],
    ) -> tuple[Arrays, Arrays]:
        mean = self.aggregate(shared, updates, clients)
        return momentum_step(shared, server_state, mean, self.options.server_momentum)

    def download(self, shared: Arrays, client: Participant) -> Arrays:
        return truncate_rank(shared, client.rank)
