"""Fed-ALoRA with heterogeneous ranks: reconcile ranks through a shared dimension d_m.

Paper: Ban and Ji, "Rethinking Parameter Sharing for LLM Fine-Tuning with Multiple
LoRAs", arXiv preprint (arXiv:2509.25414): its rank-reconciling decomposition.

Client i's update is DeltaW_i = s (B0 + B2_i B1_i) M_i A_i, with

    matrix  shape        init               trained  lives
    A_i     r_i x d_in   Kaiming-uniform    yes      client only
    M_i     d_m x r_i    Kaiming-uniform    yes      client only
    B1_i    r_i x d_m    Kaiming-uniform    yes      uploaded (and kept)
    B2_i    d_out x r_i  zeros every round  yes      uploaded
    B0      d_out x d_m  zeros, then server frozen   shared

The client uploads B2_i and B1_i; the server accumulates B0 <- B0 + sum_i p_i B2_i B1_i
(p_i = n_i / sum(n)) and broadcasts B0. Every product B2_i B1_i is d_out x d_m whatever
the rank: no padding, truncation or SVD; rank(DeltaW_i) <= min(r_i, d_m). Scaling: s
from run-config ``scaling`` at the client's own rank, applied by the client only.
Up per client per layer: d_out r_i + r_i d_m floats; down: d_out d_m.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..adapters import ClientAdapter, DecomposedAdapter
from ..aggregation import accumulate_decomposed
from ..errors import require
from ..models import BaseModel
from ..screening import update_size
from ..types import Arrays, LayerShapes, module_of
from .base import Method, MethodOptions, Participant
from .fedalora import FED_ALORA
from .registry import register_method


@dataclass(frozen=True)
class DecompositionOptions(MethodOptions):
    intermediate_rank: int = field(
        default=16,
        metadata={
            "help": "the shared dimension d_m of B0 (d_out x d_m); it caps every client's rank"
        },
    )

    def validate(self) -> None:
        require(
            self.intermediate_rank > 0,
            "intermediate-rank",
            "must be a positive integer "
            f"(the shared dimension d_m, e.g. 16), got {self.intermediate_rank}",
        )


@register_method
class FedALoRAHetero(Method):
    """Heterogeneous Fed-ALoRA: the server accumulates B2_i B1_i into the shared B0."""

    name = "fedalora-hetero"
    paper = FED_ALORA
    heterogeneous = True
    nonlinear_reason = None
    Options = DecompositionOptions
    options: DecompositionOptions
    uploads = ("B2", "B1")
    downloads = ("B0",)
    keeps = ("A", "M", "B1")

    def tensor_shapes(self, d_out: int, d_in: int, rank: int) -> dict[str, tuple[int, ...]]:
        d_m = self.options.intermediate_rank
        return {
            "A": (rank, d_in),
            "M": (d_m, rank),
            "B1": (rank, d_m),
            "B2": (d_out, rank),
            "B0": (d_out, d_m),
        }

    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        d_m = self.options.intermediate_rank
        return {f"{m}.B0": np.zeros((d_out, d_m), np.float32) for m, (d_out, _) in layers.items()}

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        return accumulate_decomposed(shared, updates, [c.num_examples for c in clients])

    def applied_size(self, upload: Arrays, rank: int) -> tuple[float, float]:
        """Of B2_i B1_i: what the client's upload adds to B0 (d_out x d_m at every rank)."""
        return update_size(_products(upload))

    def make_adapter(self, base: BaseModel, rank: int, dropout: float) -> ClientAdapter:
        return DecomposedAdapter(
            base,
            rank,
            self.scaling.scale(rank),
            dropout,
            self.options.intermediate_rank,
        )

    def shared_delta(self, installed: Arrays, upload: Arrays) -> Arrays:
        """B2_i @ B1_i per layer: d_out x d_m, the same space whatever the rank."""
        products = _products(upload)
        return {key: products[key] for key in installed}

    def start_round(self, adapter: ClientAdapter) -> None:
        """B2 <- 0, so the round starts from exactly the shared B0."""
        tensors = adapter.tensors()
        with torch.no_grad():
            for m in adapter.targets:
                tensors[f"{m}.B2"].zero_()


def _products(upload: Arrays) -> Arrays:
    """``<module>.B0``: B2_i @ B1_i of every layer of an upload."""
    return {
        f"{m}.B0": upload[f"{m}.B2"] @ upload[f"{m}.B1"]
        for m in (module_of(k) for k in upload if k.endswith(".B1"))
    }
