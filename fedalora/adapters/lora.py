"""PEFT's own LoRA layer at the client's rank: tensors ``<module>.lora_A`` (r x d_in)
and ``<module>.lora_B`` (d_out x r), PEFT's layout and initialisation, with the LoRA
variants of ``fedalora.variants`` (DoRA adds ``<module>.lora_magnitude``, d_out)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer
from torch import nn

from ..models import BaseModel, transposed_weights
from ..training import LocalRecipe
from ..variants import MAGNITUDE, Variants
from .adapter import ClientAdapter, PeftFactors

LORA_A, LORA_B = "lora_A", "lora_B"


class LoRAAdapter(ClientAdapter):
    """PEFT LoRA; ``peft_scaling`` holds the ``LoraConfig`` fields that give PEFT the
    client's scale s (``lora_alpha``, ``use_rslora``), ``variants`` the LoRA variants."""

    def __init__(
        self,
        base: BaseModel,
        rank: int,
        scale: float,
        dropout: float,
        peft_scaling: Mapping[str, Any],
        variants: Variants | None = None,
    ) -> None:
        self.peft_scaling = dict(peft_scaling)
        self.variants = variants or Variants()
        #: Per module, the principal init (A_0, s B_0) that a PiSSA/OLoRA base lacks.
        self.initial: PeftFactors = {}
        super().__init__(base, rank, scale, dropout)

    def _attach(self, model: nn.Module, dropout: float) -> nn.Module:
        variants = self.variants
        principal = variants.lora_init != "default"
        if principal:  # PEFT rewrites the base weight in place: give it our own copy
            for m in self.targets:
                layer: Any = model.get_submodule(m)
                layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        init: Any = variants.lora_init if principal else True  # PEFT's "pissa", "olora"
        config = LoraConfig(
            r=self.rank,
            target_modules=self.targets,
            lora_dropout=dropout,
            use_dora=variants.dora,
            init_lora_weights=init,
            fan_in_fan_out=transposed_weights(model, self.targets),
            **self.peft_scaling,
        )
        peft_model = get_peft_model(model, config)
        for m in self.targets:
            lora: Any = peft_model.get_base_model().get_submodule(m)
            a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
            if principal:
                self.initial[m] = (a.detach().clone(), self.scale * b.detach().clone())
            if variants.lora_fa:
                a.requires_grad_(False)
        return peft_model

    @property
    def inner_model(self) -> nn.Module:
        return self.model.get_base_model()  # type: ignore[operator]

    def layer(self, module: str) -> Any:
        """PEFT's LoRA layer wrapping target ``module`` (``lora_A``, ``lora_B``,
        ``base_layer``, ``scaling``)."""
        return self.inner_model.get_submodule(module)

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            f"{m}.{name}": getattr(self.layer(m), name)["default"].weight
            for m in self.targets
            for name in (LORA_A, LORA_B)
        }
        if self.variants.dora:
            tensors.update(
                {
                    f"{m}.{MAGNITUDE}": self.layer(m).lora_magnitude_vector["default"].weight
                    for m in self.targets
                }
            )
        return tensors

    @classmethod
    def pool_shared_factor(cls, adapters: Sequence[LoRAAdapter]) -> None:
        """ALoRA's pooled model (one rank): every client's ``lora_B`` is the first's."""
        for module in adapters[0].targets:
            shared = adapters[0].layer(module).lora_B["default"]
            for adapter in adapters[1:]:
                adapter.layer(module).lora_B["default"].weight = shared.weight

    def cohort_problem(self) -> str | None:
        return self.variants.cohort_problem() or super().cohort_problem()

    def output_delta(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """s B A dropout(x), plus what a method's wrapper of the frozen layer adds (an
        ``output_delta`` of its own, as FLoRA's merged update has)."""
        return functools.reduce(operator.add, self.output_terms(module, x))

    def output_terms(self, module: str, x: torch.Tensor) -> list[torch.Tensor]:
        """PEFT's order: the wrapper's term (added to the frozen output inside the base
        layer), then s B A dropout(x)."""
        lora = self.layer(module)
        a, b = lora.lora_A["default"], lora.lora_B["default"]
        delta = b(a(lora.lora_dropout["default"](x))) * lora.scaling["default"]
        wrapper_delta = getattr(lora.base_layer, "output_delta", None)
        return [delta] if wrapper_delta is None else [wrapper_delta(x), delta]

    def peft_factors(self) -> PeftFactors:
        """(A, s B); on a principal init's residual base also (A_0, -s B_0), so that the
        factors are exact on the plain base (rank 2r)."""
        tensors, factors = self.tensors(), {}
        for m in self.targets:
            a = tensors[f"{m}.{LORA_A}"].detach()
            b = self.scale * tensors[f"{m}.{LORA_B}"].detach()
            if m in self.initial:
                a0, b0 = self.initial[m]
                a, b = torch.cat([a, a0]), torch.cat([b, -b0], dim=1)
            factors[m] = (a, b)
        return factors

    def optimiser(
        self, recipe: LocalRecipe, steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW, or through PEFT LoRA+'s (B's learning rate ``lora-plus-ratio`` times
        A's) or LoRA-FA's (A frozen, B's gradient projected)."""
        model = self.model
        assert isinstance(model, PeftModel)
        if self.variants.lora_plus_ratio != 1.0:
            optimizer = create_loraplus_optimizer(
                model,
                torch.optim.AdamW,
                lr=recipe.lr,
                loraplus_lr_ratio=self.variants.lora_plus_ratio,
                weight_decay=recipe.weight_decay,
            )
        elif self.variants.lora_fa:
            optimizer = create_lorafa_optimizer(
                model,
                r=self.rank,
                lora_alpha=self.peft_scaling["lora_alpha"],
                lr=recipe.lr,
                weight_decay=recipe.weight_decay,
            )
        else:
            return super().optimiser(recipe, steps)
        return optimizer, recipe.scheduler(optimizer, steps)

    def export_fields(self) -> dict[str, Any]:
        return {"use_dora": True} if self.variants.dora else {}
