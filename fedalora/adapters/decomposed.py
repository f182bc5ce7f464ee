"""Fed-ALoRA's rank-reconciling layer, DeltaW = s (B0 + B2 B1) M A, and its wiring.

All clients share the intermediate dimension d_m, so the server can add every
client's DeltaB = B2 B1 (d_out x d_m) into one B0 whatever the client's rank r.

    matrix  shape        init              trained  lives
    A       r x d_in     Kaiming-uniform   yes      client only
    M       d_m x r      Kaiming-uniform   yes      client only
    B1      r x d_m      Kaiming-uniform   yes      uploaded
    B2      d_out x r    zeros             yes      uploaded
    B0      d_out x d_m  zeros/from server frozen   shared (a buffer)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models import BaseModel, adapter_placement, layer_dims
from .adapter import ClientAdapter, PeftFactors, lora_a_init_


class DecomposedLoRALinear(nn.Module):
    """Wraps a frozen linear layer W0 (``ADAPTABLE_LAYERS``, quantised or not):
    y = W0 x + s (B0 h + B2 (B1 h)), h = M A x, the adapter in full precision."""

    B0: torch.Tensor  # a buffer: the shared state, frozen on the client

    def __init__(
        self, base: nn.Module, rank: int, intermediate_rank: int, scale: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.base = base
        self.rank, self.intermediate_rank, self.scale = rank, intermediate_rank, scale
        d_out, d_in = layer_dims(base)
        device, dtype = adapter_placement(base)
        self.A = nn.Parameter(torch.empty(rank, d_in, device=device, dtype=dtype))
        self.M = nn.Parameter(torch.empty(intermediate_rank, rank, device=device, dtype=dtype))
        self.B1 = nn.Parameter(torch.empty(rank, intermediate_rank, device=device, dtype=dtype))
        self.B2 = nn.Parameter(torch.zeros(d_out, rank, device=device, dtype=dtype))
        self.register_buffer(
            "B0", torch.zeros(d_out, intermediate_rank, device=device, dtype=dtype)
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_private()

    def reset_private(self) -> None:
        """Kaiming-uniform A, M, B1 (PEFT's LoRA-A init); B2 back to zero."""
        for weight in (self.A, self.M, self.B1):
            lora_a_init_(weight)
        self.reset_round()

    def reset_round(self) -> None:
        """B2 <- 0, so the round starts from exactly the shared B0."""
        with torch.no_grad():
            self.B2.zero_()

    def up_projection(self) -> torch.Tensor:
        """The effective d_out x r up-projection (B0 + B2 B1) M."""
        return (self.B0 + self.B2 @ self.B1) @ self.M

    def delta_weight(self) -> torch.Tensor:
        """DeltaW = s (B0 + B2 B1) M A, d_out x d_in."""
        return self.scale * self.up_projection() @ self.A

    def output_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's part of the output, s (B0 h + B2 (B1 h))."""
        h = nn.functional.linear(nn.functional.linear(self.dropout(x), self.A), self.M)
        update = nn.functional.linear(h, self.B0) + nn.functional.linear(
            nn.functional.linear(h, self.B1), self.B2
        )
        return self.scale * update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.output_delta(x)  # before the frozen product: autograd's order as ever
        return self.base(x) + delta


class DecomposedAdapter(ClientAdapter):
    """``DecomposedLoRALinear`` layers on the targets, tensors ``<module>.A``, ``.M``,
    ``.B1``, ``.B2`` and ``.B0`` (d_m = ``intermediate_rank``)."""

    def __init__(
        self,
        base: BaseModel,
        rank: int,
        scale: float,
        dropout: float,
        intermediate_rank: int,
    ) -> None:
        self.intermediate_rank = intermediate_rank
        super().__init__(base, rank, scale, dropout)

    def _attach(self, model: nn.Module, dropout: float) -> nn.Module:
        model.requires_grad_(False)
        for name in self.targets:
            base = model.get_submodule(name)
            layer = DecomposedLoRALinear(
                base, self.rank, self.intermediate_rank, self.scale, dropout
            )
            model.set_submodule(name, layer)
        return model

    def layer(self, module: str) -> DecomposedLoRALinear:
        layer = self.model.get_submodule(module)
        assert isinstance(layer, DecomposedLoRALinear)
        return layer

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for m in self.targets:
            layer = self.layer(m)
            tensors.update(
                {
                    f"{m}.A": layer.A,
                    f"{m}.M": layer.M,
                    f"{m}.B1": layer.B1,
                    f"{m}.B2": layer.B2,
                    f"{m}.B0": layer.B0,
                }
            )
        return tensors

    @classmethod
    def pool_shared_factor(cls, adapters: Sequence[DecomposedAdapter]) -> None:
        """ALoRA's pooled model over different ranks: B0 (d_out x d_m) becomes one
        trainable Parameter for every client and B2 = 0 stays frozen, so that
        DeltaW_k = s B0 M_k A_k."""
        for module in adapters[0].targets:
            shared = nn.Parameter(adapters[0].layer(module).B0.detach().clone())
            for adapter in adapters:
                layer = adapter.layer(module)
                layer.B0 = shared  # the frozen buffer becomes the shared, trained B
                layer.B2.requires_grad_(False)
                layer.B1.requires_grad_(False)

    def output_delta(self, module: str, x: torch.Tensor) -> torch.Tensor:
        return self.layer(module).output_delta(x)

    def peft_factors(self) -> PeftFactors:
        with torch.no_grad():
            return {
                m: (self.layer(m).A.detach().clone(), self.scale * self.layer(m).up_projection())
                for m in self.targets
            }
