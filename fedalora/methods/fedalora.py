"""Fed-ALoRA with one rank for every client: share and average B, keep A private.

Paper: Ban and Ji, "Rethinking Parameter Sharing for LLM Fine-Tuning with Multiple
LoRAs", arXiv preprint (arXiv:2509.25414); Fed-ALoRA is its federated method.

Rule, per adapted layer: client i trains A_i (r x d_in) and B_i (d_out x r) and
uploads B_i; the server sets B <- sum_i p_i B_i (p_i = n_i / sum(n)) and broadcasts
it. A_i never leaves client i. Round 1 starts from B = 0 and every client's A_i from
the same seeded PEFT init (A_0, as the authors' code does). Scaling: s of the common
rank from run-config ``scaling``, applied by the client only.
Up and down per client per layer: d_out r floats each way.
"""

from __future__ import annotations

from .base import Paper
from .lora_factors import FactorAveraging
from .registry import register_method

#: The paper of Fed-ALoRA (both rank settings).
FED_ALORA = Paper(
    "Ban and Ji",
    "Rethinking Parameter Sharing for LLM Fine-Tuning with Multiple LoRAs",
    "arXiv preprint",
    "2509.25414",
)


@register_method
class FedALoRA(FactorAveraging):
    """Homogeneous Fed-ALoRA: FedAvg over the shared B matrices only."""

    name = "fedalora"
    paper = FED_ALORA
    uploads = downloads = ("lora_B",)
    keeps = ("lora_A",)
