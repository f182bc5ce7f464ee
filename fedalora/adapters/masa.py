"""MASA's layer: a bank of A experts shared by every adapted layer of one input size,
and one B per layer that integrates them.

    h = sum_e g_e A_e x,   g = softmax(w)   (w: the layer's own E mixing logits)
    y = W0 x + s B h

    tensor   shape          init               lives
    bank     E x r x d_in   Kaiming-uniform    one per input size d_in, every layer's
    mix      E              zeros (g uniform)  per layer
    B        d_out x r      zeros              per layer
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models import BaseModel, adapter_placement, layer_dims
from .adapter import ClientAdapter, PeftFactors, lora_a_init_


class MASALinear(nn.Module):
    """Wraps a frozen linear layer W0 (``ADAPTABLE_LAYERS``, quantised or not) with
    ``bank`` (E x r x d_in, shared with other layers), its own mixing logits and its own
    B, in full precision."""

    def __init__(
        self, base: nn.Module, bank: nn.Parameter, scale: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.base, self.bank, self.scale = base, bank, scale
        experts, rank, _ = bank.shape
        d_out, _ = layer_dims(base)
        self.mix = nn.Parameter(torch.zeros(experts, device=bank.device, dtype=bank.dtype))
        self.B = nn.Parameter(torch.zeros(d_out, rank, device=bank.device, dtype=bank.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def mixed_a(self) -> torch.Tensor:
        """The layer's effective down-projection sum_e g_e A_e (r x d_in)."""
        return torch.einsum("e,erd->rd", torch.softmax(self.mix, dim=0), self.bank)

    def output_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's part of the output, s B h."""
        h = nn.functional.linear(self.dropout(x), self.mixed_a())
        return self.scale * nn.functional.linear(h, self.B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.output_delta(x)  # before the frozen product: autograd's order as ever
        return self.base(x) + delta


def expert_bank(
    experts: int, rank: int, d_in: int, device: torch.device, dtype: torch.dtype
) -> nn.Parameter:
    """E experts of r x d_in, each with PEFT's LoRA-A init (Kaiming-uniform, a = sqrt(5))."""
    bank = nn.Parameter(torch.empty(experts, rank, d_in, device=device, dtype=dtype))
    for expert in bank:
        lora_a_init_(expert)
    return bank


class MASAAdapter(ClientAdapter):
    """``MASALinear`` layers on the targets, one ``experts``-expert bank per input size:
    tensors ``<module>.lora_B``, ``<module>.mix`` and ``<module>.bank`` (the bank of the
    module's input size, the same tensor for all of them)."""

    def __init__(
        self,
        base: BaseModel,
        rank: int,
        scale: float,
        dropout: float,
        experts: int,
    ) -> None:
        self.experts = experts
        super().__init__(base, rank, scale, dropout)

    def _attach(self, model: nn.Module, dropout: float) -> nn.Module:
        model.requires_grad_(False)
        banks: dict[int, nn.Parameter] = {}
        for name in self.targets:
            base = model.get_submodule(name)
            _, d_in = layer_dims(base)
            if d_in not in banks:
                banks[d_in] = expert_bank(self.experts, self.rank, d_in, *adapter_placement(base))
            model.set_submodule(name, MASALinear(base, banks[d_in], self.scale, dropout))
        return model

    def layer(self, module: str) -> MASALinear:
        layer = self.model.get_submodule(module)
        assert isinstance(layer, MASALinear)
        return layer

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for m in self.targets:
            layer = self.layer(m)
            tensors.update({f"{m}.lora_B": layer.B, f"{m}.mix": layer.mix, f"{m}.bank": layer.bank})
        return tensors

    @classmethod
    def pool_shared_factor(cls, adapters: Sequence[MASAAdapter]) -> None:
        """The centralised MASA reference (one rank): every client's B is the first's;
        each keeps its bank and mixing weights."""
        for module in adapters[0].targets:
            for adapter in adapters[1:]:
                adapter.layer(module).B = adapters[0].layer(module).B

    def output_delta(self, module: str, x: torch.Tensor) -> torch.Tensor:
        return self.layer(module).output_delta(x)

    def peft_factors(self) -> PeftFactors:
        """Exact: lora_A = sum_e g_e A_e and lora_B = s B per layer."""
        with torch.no_grad():
            return {
                m: (
                    self.layer(m).mixed_a().detach().clone(),
                    self.scale * self.layer(m).B.detach().clone(),
                )
                for m in self.targets
            }
