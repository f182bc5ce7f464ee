"""LoRA-FAIR: the server corrects the averaged B so that its product with the averaged A
points where the average of the clients' products does; clients start from both.

Paper: Bian, Wang, Zhang and Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation
and Initialization Refinement", ICCV 2025 (arXiv:2411.14961).

Rule, per adapted layer, one rank r for every client: clients upload A_i (r x d_in) and
B_i (d_out x r); the server averages A = sum_i p_i A_i and B = sum_i p_i B_i
(p_i = n_i / sum(n)), forms the ideal update DeltaW = sum_i p_i B_i A_i (float64) and
finds the residual correction dB (d_out x r) of

    min_dB  1 - cos(DeltaW, (B + dB) A) + lambda ||dB||_F^2,

then broadcasts A and B' = B + dB, from which every client continues (the paper's
refined initialisation; FedIT's average otherwise). Only B is corrected (the paper's
ablation prefers it to correcting A or both). As in the authors' code, cos is the mean
over the columns of the d_out x d_in matrices (one per input feature) of their cosine
similarity, and the problem is solved by plain gradient descent on the server:
``lora-fair-steps`` steps (500) of rate ``lora-fair-lr`` (0.01) from dB = 0, with
``lora-fair-lambda`` (0.01). dB starts at zero (the authors' code draws it at random,
Xavier-uniform; zero starts the search at FedIT's average and needs no seed). The
cosine ignores the common scale s, so the server uses the raw factors. Round 1 starts
from A = seeded Kaiming-uniform, B = 0. Ranks: one, as in the paper. Variants: LoRA+
(DoRA's magnitude and a principal init change what B A means to the layer; LoRA-FA's
frozen A leaves nothing to correct). DP: refused (the correction is a non-linear
function of every client's factors). The exported adapter is the client's A and s B.
Up and down per client per layer: r (d_in + d_out) floats each way, as FedIT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..aggregation import lora_product_sum, modules_of, weighted_average
from ..errors import require
from ..types import Arrays
from .base import MethodOptions, Paper, Participant
from .lora_factors import FactorAveraging
from .registry import register_method


@dataclass(frozen=True)
class RefinementOptions(MethodOptions):
    lora_fair_lambda: float = field(
        default=0.01,
        metadata={"help": "LoRA-FAIR's lambda: weight of ||dB||_F^2 beside the cosine term"},
    )
    lora_fair_steps: int = field(
        default=500,
        metadata={"help": "gradient steps the server takes on LoRA-FAIR's correction dB"},
    )
    lora_fair_lr: float = field(
        default=0.01, metadata={"help": "step size of the server's LoRA-FAIR refinement"}
    )

    def validate(self) -> None:
        require(self.lora_fair_lambda >= 0, "lora-fair-lambda", "must be >= 0, e.g. 0.01")
        require(self.lora_fair_steps >= 0, "lora-fair-steps", "must be >= 0 (0: FedIT)")
        require(self.lora_fair_lr > 0, "lora-fair-lr", "must be > 0, e.g. 0.01")


def refined_b(
    a: np.ndarray, b: np.ndarray, target: np.ndarray, options: RefinementOptions
) -> np.ndarray:
    """B + dB, dB minimising 1 - mean column cosine(target, (B + dB) A) + lambda ||dB||^2
    by ``lora-fair-steps`` gradient steps from zero (float64)."""
    a_t, b_t, target_t = (torch.from_numpy(np.asarray(x, np.float64)) for x in (a, b, target))
    correction = torch.zeros_like(b_t, requires_grad=True)
    optimiser = torch.optim.SGD([correction], lr=options.lora_fair_lr)
    for _ in range(options.lora_fair_steps):
        optimiser.zero_grad()
        cosine = torch.nn.functional.cosine_similarity(target_t, (b_t + correction) @ a_t, dim=0)
        loss = 1 - cosine.mean() + options.lora_fair_lambda * correction.square().sum()
        loss.backward()
        optimiser.step()
    return (b_t + correction).detach().numpy().astype(np.float32)


def refined_average(
    updates: Sequence[Arrays], num_examples: Sequence[float], options: RefinementOptions
) -> dict[str, np.ndarray]:
    """LoRA-FAIR's rule: the averaged ``lora_A`` and, per layer, the refined ``lora_B``."""
    averaged = weighted_average(updates, num_examples)
    for module in modules_of(updates[0]):
        target = lora_product_sum(updates, num_examples, [1.0] * len(updates), module)
        averaged[f"{module}.lora_B"] = refined_b(
            averaged[f"{module}.lora_A"], averaged[f"{module}.lora_B"], target, options
        )
    return averaged


@register_method
class LoRAFAIR(FactorAveraging):
    """FedIT's averages with B refined towards the average of the clients' products."""

    name = "lora-fair"
    paper = Paper(
        "Bian, Wang, Zhang and Xu",
        "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization Refinement",
        "ICCV 2025",
        "2411.14961",
    )
    Options = RefinementOptions
    options: RefinementOptions
    accepts = frozenset({"lora-plus-ratio"})
    nonlinear_reason = (
        "its correction of B is a non-linear function of every client's factors, not a "
        "mean of clipped per-client updates"
    )
    uploads = downloads = ("lora_A", "lora_B")

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        return refined_average(updates, [c.num_examples for c in clients], self.options)
