"""MASA, federated: a private bank of A experts shared across a client's layers, one
shared B per layer.

Paper: Dong et al., "MASA: Rethinking the Representational Bottleneck in LoRA with
Multi-A Shared Adaptation", arXiv preprint (arXiv:2510.06005): multi-A, single-B; an
ensemble of A experts shared across layers, integrated by one B per layer, at LoRA's
parameter budget.

Design choices (the paper's layer-grouping and integration details are not in the
material this project could read; each choice is the simplest that keeps its idea):
- The bank: E experts (``masa-experts``), each r_i x d_in, one bank per input size
  d_in shared by every adapted layer of that size (for q/v of a transformer: one bank
  for all layers). Kaiming-uniform as LoRA's A; every client starts from the same
  seeded bank, as every client starts from the same A_0 in the other methods.
- Integration: layer l mixes the experts with its own softmax weights,
  h = sum_e softmax(w_l)_e A_e x, and y = W0 x + s B_l h; w_l starts at 0 (an even mix).
- Federation (Fed-ALoRA's asymmetry taken further): B_l (d_out x r_i) is uploaded and
  shared; the bank and the mixing weights never leave the client.
- Heterogeneous capacity: through the experts' rank r_i (``ranks``). The server pads
  every B_l to r_max and averages each rank slot over the clients that have it, their
  weights p_i = n_i / sum(n) renormalised over them (zero-padding's rule); client i
  takes the first r_i columns.
Parameters per client: E r d_in per bank plus (r d_out + E) per layer, against LoRA's
r (d_in + d_out) per layer. Scaling: s(r_i) from run-config ``scaling``, on the client.
Up and down per client per layer: d_out r_i floats (the server sends each client its
own r_i columns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..adapters import ClientAdapter
from ..adapters.masa import MASAAdapter
from ..aggregation import truncate_rank, zero_pad_average
from ..errors import require
from ..models import BaseModel
from ..types import Arrays, LayerShapes
from .base import Method, MethodOptions, Paper, Participant
from .lora_factors import initial_lora, padded_rank
from .registry import register_method


@dataclass(frozen=True)
class MASAOptions(MethodOptions):
    masa_experts: int = field(
        default=4, metadata={"help": "A experts in each client's bank (shared across layers)"}
    )

    def validate(self) -> None:
        require(
            self.masa_experts >= 1,
            "masa-experts",
            f"must be >= 1 (A experts per bank), got {self.masa_experts}",
        )


@register_method
class MASA(Method):
    """Private expert banks shared across layers; each layer's B averaged."""

    name = "masa"
    paper = Paper(
        "Dong et al.",
        "MASA: Rethinking the Representational Bottleneck in LoRA with Multi-A Shared Adaptation",
        "arXiv preprint",
        "2510.06005",
    )
    heterogeneous = True
    nonlinear_reason = None
    pooled_reference = True
    Options = MASAOptions
    options: MASAOptions
    uploads = downloads = ("lora_B",)
    keeps = ("bank", "mix")

    def tensor_shapes(self, d_out: int, d_in: int, rank: int) -> dict[str, tuple[int, ...]]:
        experts = self.options.masa_experts
        return {"lora_B": (d_out, rank), "bank": (experts, rank, d_in), "mix": (experts,)}

    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        return initial_lora(layers, max(ranks), self.seed, self.downloads)  # B = 0

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        return zero_pad_average(
            updates, [c.num_examples for c in clients], padded_rank(shared), slots="holders"
        )

    def download(self, shared: Arrays, client: Participant) -> Arrays:
        return truncate_rank(shared, client.rank)

    def make_adapter(self, base: BaseModel, rank: int, dropout: float) -> ClientAdapter:
        return MASAAdapter(
            base,
            rank,
            self.scaling.scale(rank),
            dropout,
            self.options.masa_experts,
        )
