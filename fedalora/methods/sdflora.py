"""SDFLoRA: each client's adapter is a global module, averaged across clients, and a
local module that never leaves it; under DP only the global module is noised.

Paper: Shen, Lu, Wan and Chen, "SDFLoRA: Selective Decoupled Federated LoRA for
Privacy-preserving Fine-tuning with Heterogeneous Clients", arXiv preprint, 2026
(arXiv:2601.11219; its first version: "Selective Dual-Module LoRA for Federated
Fine-tuning with Heterogeneous Clients").

Of the 2026 methods that split each adapter into a shared and a private part this is
the one nearest to Fed-ALoRA's asymmetry: a private part that never travels, rank
heterogeneity carried by that private part, and DP noise only on what is shared.
(Fed-PLoRA, arXiv:2602.16936, has no private part: every rank-1 module is global.)

Rule, per adapted layer: client i's LoRA of rank r_i is a global module of rank r_g
(``global-rank``, the same for every client) and a local module of rank r_i - r_g,
DeltaW_i = s (B_g A_g + B_l A_l), held as one PEFT LoRA whose first r_g rank slots are
the global module (``global_A`` = lora_A[:r_g], r_g x d_in; ``global_B`` =
lora_B[:, :r_g], d_out x r_g). Clients upload the global module; the server averages it,
A_g <- sum_i p_i A_g,i and B_g <- sum_i p_i B_g,i (p_i = n_i / sum(n)), and broadcasts
it; the local module stays on the client. The authors' code runs the two modules as
parallel LoRAs with learnable fusion weights and offers FedAvg or FLoRA-style
stacking for the global one; here the global module is averaged (the fixed rank
budget the paper's later version keeps) and the fusion weights are left out (a scalar
on a LoRA branch is absorbed by its B). Round 1 starts from a seeded global A
(Kaiming-uniform, rank r_g) and B = 0; each client's local module starts from PEFT's
init. Scaling: the layer's one s(r_i) for both modules (with the default
``scaling='constant'`` the same on every client). Variants: LoRA+. DP: supported; the
client's update is the change of its global module, so clipping and noise touch only
the shared part, the paper's point (``fedalora.privacy``, with its accounting). Every
client's rank must be at least ``global-rank`` (one of rank r_g has no local module).
The exported adapter is both modules.
Up and down per client per layer: r_g (d_in + d_out) floats each way, whatever r_i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..adapters import ClientAdapter, LoRAAdapter
from ..adapters.lora import LORA_A, LORA_B
from ..errors import ConfigError, require
from ..models import BaseModel
from ..types import Arrays, LayerShapes
from .base import MethodOptions, Paper
from .lora_factors import FactorAveraging, seeded_lora_a
from .registry import register_method

GLOBAL_A, GLOBAL_B = "global_A", "global_B"


@dataclass(frozen=True)
class DualModuleOptions(MethodOptions):
    global_rank: int = field(
        default=4,
        metadata={
            "help": "SDFLoRA's rank r_g of the global module, the same for every client; "
            "each client's local module has its rank minus r_g"
        },
    )

    def validate(self) -> None:
        require(self.global_rank >= 1, "global-rank", "must be >= 1, e.g. 4")


class DualModuleAdapter(LoRAAdapter):
    """PEFT LoRA whose first ``global_rank`` rank slots are the global module, named
    ``global_A`` and ``global_B`` (views of ``lora_A`` and ``lora_B``)."""

    def __init__(self, *args: Any, global_rank: int, **kwargs: Any) -> None:
        self.global_rank = global_rank
        super().__init__(*args, **kwargs)

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().tensors()
        r_g = self.global_rank
        for m in self.targets:
            tensors[f"{m}.{GLOBAL_A}"] = tensors[f"{m}.{LORA_A}"][:r_g]
            tensors[f"{m}.{GLOBAL_B}"] = tensors[f"{m}.{LORA_B}"][:, :r_g]
        return tensors


@register_method
class SDFLoRA(FactorAveraging):
    """A global module averaged across clients beside a private local module."""

    name = "sdflora"
    paper = Paper(
        "Shen, Lu, Wan and Chen",
        "SDFLoRA: Selective Decoupled Federated LoRA for Privacy-preserving Fine-tuning "
        "with Heterogeneous Clients",
        "arXiv preprint, 2026",
        "2601.11219",
    )
    heterogeneous = True
    Options = DualModuleOptions
    options: DualModuleOptions
    accepts = frozenset({"lora-plus-ratio"})
    uploads = downloads = (GLOBAL_A, GLOBAL_B)
    keeps = (LORA_A, LORA_B)

    def tensor_shapes(self, d_out: int, d_in: int, rank: int) -> dict[str, tuple[int, ...]]:
        r_g = self.options.global_rank
        return {
            **super().tensor_shapes(d_out, d_in, rank),
            GLOBAL_A: (r_g, d_in),
            GLOBAL_B: (d_out, r_g),
        }

    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        r_g = self.options.global_rank
        if min(ranks) < r_g:
            raise ConfigError(
                "ranks",
                f"every client's rank must be at least global-rank={r_g} (its local module "
                f"has the rest), but a client has rank {min(ranks)}; lower global-rank or "
                "raise that rank",
            )
        shared: Arrays = {}
        for m, (d_out, d_in) in layers.items():
            shared[f"{m}.{GLOBAL_A}"] = seeded_lora_a(self.seed, m, r_g, d_in)
            shared[f"{m}.{GLOBAL_B}"] = np.zeros((d_out, r_g), np.float32)
        return shared

    def make_adapter(self, base: BaseModel, rank: int, dropout: float) -> ClientAdapter:
        return DualModuleAdapter(
            base,
            rank,
            self.scaling.scale(rank),
            dropout,
            self.scaling.peft_fields(rank),
            self.variants,
            global_rank=self.options.global_rank,
        )
