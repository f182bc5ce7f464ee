"""PEFT's own LoRA layer at the client's rank: tensors ``<module>.lora_A`` (r x d_in)
and ``<module>.lora_B`` (d_out x r), PEFT's layout and initialisation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from .adapter import ClientAdapter, PeftFactors

LORA_A, LORA_B = "lora_A", "lora_B"


class LoRAAdapter(ClientAdapter):
    """PEFT LoRA; ``peft_scaling`` holds the ``LoraConfig`` fields that give PEFT the
    client's scale s (``lora_alpha``, ``use_rslora``)."""

    def __init__(
        self,
        base_model: nn.Module,
        targets: list[str],
        head_modules: list[str],
        rank: int,
        scale: float,
        dropout: float,
        peft_scaling: Mapping[str, Any],
    ) -> None:
        self.peft_scaling = dict(peft_scaling)
        super().__init__(base_model, targets, head_modules, rank, scale, dropout)

    def _attach(self, model: nn.Module, dropout: float) -> nn.Module:
        config = LoraConfig(
            r=self.rank, target_modules=self.targets, lora_dropout=dropout, **self.peft_scaling
        )
        return get_peft_model(model, config)

    @property
    def inner_model(self) -> nn.Module:
        return self.model.get_base_model()  # type: ignore[operator]

    def layer(self, module: str) -> Any:
        """PEFT's LoRA layer wrapping target ``module`` (``lora_A``, ``lora_B``,
        ``base_layer``, ``scaling``)."""
        return self.inner_model.get_submodule(module)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"{m}.{name}": getattr(self.layer(m), name)["default"].weight
            for m in self.targets
            for name in (LORA_A, LORA_B)
        }

    def peft_factors(self) -> PeftFactors:
        tensors = self.tensors()
        return {
            m: (tensors[f"{m}.{LORA_A}"].detach(), self.scale * tensors[f"{m}.{LORA_B}"].detach())
            for m in self.targets
        }
