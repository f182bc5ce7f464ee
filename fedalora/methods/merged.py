"""A client's private dense update to its frozen weights, for the methods that fold
what their LoRA factors cannot carry into the base (FLoRA's stacked products,
FedEx-LoRA's residual): each adapted layer computes W0 x + merged x + s B A x, with W0
the worker's shared frozen weight (quantised or not) and ``merged`` (d_out x d_in)
the client's own, kept in its bookkeeping state ``merged.<module>``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapters import ClientAdapter, LoRAAdapter, PeftFactors
from ..models import layer_dims

#: Client bookkeeping key prefix of each module's merged update.
MERGED = "merged."


class MergedLayer(nn.Module):
    """A frozen layer W0 (as stored: shared, quantised or not) plus this client's merged
    update: y = W0 x + merged x."""

    merged: torch.Tensor  # d_out x d_in, a buffer: frozen

    def __init__(self, base: nn.Module, merged: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("merged", merged, persistent=False)

    def output_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The merged update's part of the output, merged x."""
        return nn.functional.linear(x, self.merged)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base(x, *args, **kwargs) + self.output_delta(x)


def add_merged_updates(adapter: ClientAdapter) -> None:
    """Give every adapted layer of a PEFT LoRA ``adapter`` a zero merged update."""
    for m in adapter.targets:
        base_layer = _lora(adapter, m).base_layer
        adapter.state[MERGED + m] = torch.zeros(
            layer_dims(base_layer), device=base_layer.weight.device
        )


def merged_update(adapter: ClientAdapter, module: str) -> torch.Tensor:
    """The merged update of ``module`` (live: change it in place)."""
    return adapter.state[MERGED + module]


def apply_merged_updates(adapter: ClientAdapter) -> None:
    """Make this client's frozen layers W0 + merged update (the worker's shared base
    layers are left as they are); called when the round's state is in."""
    for m in adapter.targets:
        lora = _lora(adapter, m)
        lora.base_layer = MergedLayer(lora.base_layer, merged_update(adapter, m))


def merged_factors(adapter: ClientAdapter) -> PeftFactors:
    """Merged update + the current LoRA as one exact PEFT factorisation (full-rank SVD)."""
    exact = {}
    for m, (lora_a, lora_b) in adapter.peft_factors().items():
        u, s, vt = torch.linalg.svd(
            (merged_update(adapter, m) + lora_b @ lora_a).double(), full_matrices=False
        )
        exact[m] = (vt.to(lora_a.dtype), (u * s).to(lora_a.dtype))
    return exact


def _lora(adapter: ClientAdapter, module: str) -> Any:
    assert isinstance(adapter, LoRAAdapter)
    return adapter.layer(module)
