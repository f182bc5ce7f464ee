"""FedRot-LoRA: each client rotates its factors into alignment with the global ones
before they are averaged.

Paper: Zhang, Kim, Cha and Vikalo, "FedRot-LoRA: Mitigating Rotational Misalignment in
Federated LoRA", PMLR vol. 306, 2026 (arXiv:2602.23638).

B A = (B R)(R^T A) for any orthogonal r x r R, so two clients can learn the same update
in rotated factors, and FedIT's average of the factors then cancels what they agree
on. After local training, client i aligns one factor with the global factors it
started from (A_g, B_g, the round's download) and uploads A_i' = R^T A_i and
B_i' = B_i R, its product unchanged; the server averages them as FedIT does (with
p_i = n_i / sum(n)) and broadcasts both. R is the orthogonal Procrustes solution, one
r x r SVD U S V^T: of A_i A_g^T when A is aligned (minimising ||R^T A_i - A_g||_F), of
B_i^T B_g when B is (minimising ||B_i R - B_g||_F). Which factor alternates by round,
as in the authors' code: none in round 1 (the reference is the seeded init), A in even
rounds, B in odd ones. ``rotation-strength`` lambda < 1 is the paper's soft alignment,
the rotation nearest to (1 - lambda) I + lambda R (polar factor, kept a proper rotation);
the default 1 is the hard alignment the authors' released configurations run.
Round 1 starts from A = seeded Kaiming-uniform, B = 0; one rank for every client (R is
r x r against the global factors). Variants: all of FedIT's (a rotation leaves B A, and
so DoRA's norm and a principal init, unchanged). DP: refused (each client's rotation
depends on its own factors, so the rule is not a mean of clipped updates). The
exported adapter is the client's own A and s B.
Up and down per client per layer: r (d_in + d_out) floats each way, as FedIT: the
alignment needs no extra communication.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..adapters import ClientAdapter
from ..aggregation import modules_of
from ..errors import require
from ..types import Arrays
from .base import MethodOptions, Paper
from .lora_factors import FactorAveraging
from .registry import register_method


@dataclass(frozen=True)
class RotationOptions(MethodOptions):
    rotation_strength: float = field(
        default=1.0,
        metadata={
            "help": "FedRot-LoRA's lambda in (0, 1]: 1 aligns each client's factors fully "
            "(hard), less rotates part of the way (the paper's soft alignment)"
        },
    )

    def validate(self) -> None:
        require(
            0.0 < self.rotation_strength <= 1.0,
            "rotation-strength",
            "must be in (0, 1]: 1 is the hard alignment, e.g. 0.5 a soft one",
        )


def aligned_factor(server_round: int) -> str | None:
    """The factor a client aligns in ``server_round``: none in round 1, then A and B
    alternately."""
    if server_round <= 1:
        return None
    return "lora_A" if server_round % 2 == 0 else "lora_B"


def alignment_rotation(factor: np.ndarray, reference: np.ndarray, strength: float) -> np.ndarray:
    """The r x r orthogonal R that aligns ``factor`` with ``reference``: for A factors
    (r x d_in) the minimiser of ||R^T A - A_g||_F, for B factors pass them transposed
    (r x d_out, minimising ||B R - B_g||_F); ``strength`` < 1 takes the proper rotation
    nearest to (1 - strength) I + strength R."""
    u, _, vt = np.linalg.svd(factor.astype(np.float64) @ reference.astype(np.float64).T)
    rotation = u @ vt
    if strength == 1.0:
        return rotation
    u, _, vt = np.linalg.svd((1 - strength) * np.eye(len(rotation)) + strength * rotation)
    if np.linalg.det(u @ vt) < 0:
        u[:, -1] = -u[:, -1]
    return u @ vt


def rotate_into_alignment(
    factors: Arrays, reference: Arrays, aligned: str, strength: float
) -> dict[str, np.ndarray]:
    """Every layer's (A, B) of ``factors`` as (R^T A, B R), R aligning its ``aligned``
    factor with ``reference``'s; other arrays pass unchanged."""
    rotated = dict(factors)
    for module in modules_of(factors):
        a, b = (factors[f"{module}.{n}"].astype(np.float64) for n in ("lora_A", "lora_B"))
        if aligned == "lora_A":
            rotation = alignment_rotation(a, reference[f"{module}.lora_A"], strength)
        else:
            rotation = alignment_rotation(b.T, reference[f"{module}.lora_B"].T, strength)
        rotated[f"{module}.lora_A"] = (rotation.T @ a).astype(np.float32)
        rotated[f"{module}.lora_B"] = (b @ rotation).astype(np.float32)
    return rotated


@register_method
class FedRotLoRA(FactorAveraging):
    """FedIT over factors that each client first rotates into the global ones' frame."""

    name = "fedrot-lora"
    paper = Paper(
        "Zhang, Kim, Cha and Vikalo",
        "FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA",
        "PMLR vol. 306, 2026",
        "2602.23638",
    )
    Options = RotationOptions
    options: RotationOptions
    nonlinear_reason = (
        "each client rotates its factors by an orthogonal matrix computed from them, so "
        "the rule is not a mean of clipped per-client updates"
    )
    uploads = downloads = ("lora_A", "lora_B")

    def upload(self, adapter: ClientAdapter) -> Arrays:
        """The trained factors, rotated into the frame of the ones installed this round."""
        factors = super().upload(adapter)
        aligned = aligned_factor(adapter.server_round)
        if aligned is None:
            return factors
        return rotate_into_alignment(
            factors, adapter.installed, aligned, self.options.rotation_strength
        )
