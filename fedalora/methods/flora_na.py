"""FLoRA-NA: the server mixes the clients' factors with per-client coefficients chosen so
that the product of the mixtures approaches the average of the clients' products.

Paper: Nguyen, Nguyen, Jeong, Le and Pham, "Communication-Efficient and Accurate
Approach for Aggregation in Federated Low-Rank Adaptation" (FLoRA-NA, Federated
Low-Rank Aggregation with Nearly Accurate Estimation), arXiv preprint, 2025
(arXiv:2509.26399).

Rule, per adapted layer, one rank r for every client: clients upload A_u (r x d_in)
and B_u (d_out x r); the server estimates A = sum_u a_u A_u and B = sum_u b_u B_u,
with one coefficient per client and factor, a and b minimising
||B A - W||_F, W = sum_u p_u B_u A_u (p_u = n_u / sum(n): the weighted mean of the
products, as FedAvg weighs clients), and broadcasts A and B, from which every client
continues. Nothing beyond FedIT's factors travels. The paper's text available to this
project states the objective but not its solver; here it is solved by alternating
least squares, exactly: with b fixed the objective is a linear least-squares problem
in a (and the other way round), whose normal equations need only the clients' r x r
Gram matrices A_u A_v^T and B_u^T B_v (no d_out x d_in product is formed). It starts
from FedAvg's a = b = p, takes ``flora-na-sweeps`` sweeps (each can only lower the
objective) and keeps sum(a) = 1 (a common scale moved from a to b leaves B A as it is).
Coefficients are per layer. Round 1 starts from A = seeded Kaiming-uniform, B = 0. The
clients' common scale s does not change the minimiser. Ranks: one. Variants: LoRA+.
DP: refused (the coefficients depend on every client's factors).
Up and down per client per layer: r (d_in + d_out) floats each way, as FedIT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..aggregation import data_weights, modules_of
from ..errors import require
from ..types import Arrays
from .base import MethodOptions, Paper, Participant
from .lora_factors import FactorAveraging
from .registry import register_method


@dataclass(frozen=True)
class EstimationOptions(MethodOptions):
    flora_na_sweeps: int = field(
        default=5,
        metadata={
            "help": "FLoRA-NA's alternating least-squares sweeps over the coefficients of "
            "A and of B (0: FedIT's average)"
        },
    )

    def validate(self) -> None:
        require(self.flora_na_sweeps >= 0, "flora-na-sweeps", "must be >= 0, e.g. 5")


def mixing_coefficients(
    factors_a: Sequence[np.ndarray],
    factors_b: Sequence[np.ndarray],
    weights: np.ndarray,
    sweeps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (a, b) of one layer, from ``weights`` (FedAvg's) by ``sweeps`` of
    alternating least squares on ||(sum b_u B_u)(sum a_u A_u) - sum p_u B_u A_u||_F."""
    stack_a = np.stack([np.asarray(a, np.float64) for a in factors_a])  # U x r x d_in
    stack_b = np.stack([np.asarray(b, np.float64) for b in factors_b])  # U x d_out x r
    gram_a = np.einsum("uik,vjk->uvij", stack_a, stack_a)  # A_u A_v^T
    gram_b = np.einsum("uki,vkj->uvij", stack_b, stack_b)  # B_u^T B_v
    a, b = weights.copy(), weights.copy()
    for _ in range(sweeps):
        # a-step: B fixed, <B A_u, B A_v> = tr(B^T B A_v A_u^T), <B A_u, W> likewise
        btb = np.einsum("v,w,vwij->ij", b, b, gram_b)
        normal = np.einsum("ij,uvij->uv", btb, gram_a)
        target = np.einsum("w,v,vwij,uwij->u", weights, b, gram_b, gram_a)
        a = np.linalg.lstsq(normal, target, rcond=None)[0]
        if abs(a.sum()) > 1e-12:  # move the scale into b: B A unchanged
            b, a = b * a.sum(), a / a.sum()
        # b-step: A fixed, <B_u A, B_v A> = tr(B_u^T B_v A A^T), <B_u A, W> likewise
        aat = np.einsum("v,w,vwij->ij", a, a, gram_a)
        normal = np.einsum("uvij,ij->uv", gram_b, aat)
        target = np.einsum("w,v,uwij,vwij->u", weights, a, gram_b, gram_a)
        b = np.linalg.lstsq(normal, target, rcond=None)[0]
    return a, b


def estimated_factors(
    updates: Sequence[Arrays], num_examples: Sequence[float], sweeps: int
) -> dict[str, np.ndarray]:
    """FLoRA-NA's rule: per layer, the clients' ``lora_A`` and ``lora_B`` mixed with the
    coefficients of ``mixing_coefficients``."""
    weights = data_weights(num_examples)
    result: dict[str, np.ndarray] = {}
    for module in modules_of(updates[0]):
        factors_a = [u[f"{module}.lora_A"] for u in updates]
        factors_b = [u[f"{module}.lora_B"] for u in updates]
        a, b = mixing_coefficients(factors_a, factors_b, weights, sweeps)
        result[f"{module}.lora_A"] = sum(
            c * np.asarray(f, np.float64) for c, f in zip(a, factors_a, strict=True)
        ).astype(np.float32)
        result[f"{module}.lora_B"] = sum(
            c * np.asarray(f, np.float64) for c, f in zip(b, factors_b, strict=True)
        ).astype(np.float32)
    return result


@register_method
class FLoRANA(FactorAveraging):
    """Per-client mixing coefficients fitted so that B A approaches the mean product."""

    name = "flora-na"
    paper = Paper(
        "Nguyen, Nguyen, Jeong, Le and Pham",
        "Communication-Efficient and Accurate Approach for Aggregation in Federated "
        "Low-Rank Adaptation",
        "arXiv preprint, 2025",
        "2509.26399",
    )
    Options = EstimationOptions
    options: EstimationOptions
    accepts = frozenset({"lora-plus-ratio"})
    nonlinear_reason = (
        "its mixing coefficients are fitted to every client's factors, so the rule is not "
        "a mean of clipped per-client updates"
    )
    uploads = downloads = ("lora_A", "lora_B")

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        return estimated_factors(
            updates, [c.num_examples for c in clients], self.options.flora_na_sweeps
        )
