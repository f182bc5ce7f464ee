"""A method of one's own: FedAvg of B with an exponential moving average on the server.

Clients keep A private (as Fed-ALoRA) and upload B_i at their own rank; the server sets
B <- d B + (1 - d) sum_i p_i pad(B_i) (B_i zero-padded to the largest rank) and sends
each client the first r_i columns. Run it with
``--run-config "strategy='tests.ema_method:EmaBLoRA'"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedalora.aggregation import truncate_rank, zero_pad_average
from fedalora.errors import require
from fedalora.methods import Method, MethodOptions, Participant, register_method
from fedalora.methods.lora_factors import initial_lora, padded_rank
from fedalora.types import Arrays, LayerShapes


@dataclass(frozen=True)
class EmaOptions(MethodOptions):
    ema_decay: float = field(default=0.5, metadata={"help": "weight d of the old B"})

    def validate(self) -> None:
        require(0.0 <= self.ema_decay < 1.0, "ema-decay", "must be in [0, 1)")


@register_method
class EmaBLoRA(Method):
    """B averaged over clients (zero-padded), then blended into the old B."""

    name = "ema-b"
    paper = None
    heterogeneous = True
    Options = EmaOptions
    options: EmaOptions
    uploads = downloads = ("lora_B",)
    keeps = ("lora_A",)

    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        return initial_lora(layers, max(ranks), self.seed, self.downloads)  # B = 0

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        mean = zero_pad_average(
            updates, [c.num_examples for c in clients], padded_rank(shared), slots="all"
        )
        decay = self.options.ema_decay
        return {key: decay * shared[key] + (1 - decay) * mean[key] for key in shared}

    def download(self, shared: Arrays, client: Participant) -> Arrays:
        return truncate_rank(shared, client.rank)
