"""Client-side adapters: a client's model for a round (``ClientAdapter``) over PEFT's
LoRA layer, Fed-ALoRA's decomposed layer or MASA's shared-bank layer, and the export
as a PEFT adapter."""

from .adapter import (
    ClientAdapter,
    PeftFactors,
    export_peft_adapter,
    load_peft_adapter,
    method_state,
)
from .decomposed import DecomposedAdapter, DecomposedLoRALinear
from .lora import LoRAAdapter
from .masa import MASAAdapter, MASALinear

__all__ = [
    "ClientAdapter",
    "DecomposedAdapter",
    "DecomposedLoRALinear",
    "LoRAAdapter",
    "MASAAdapter",
    "MASALinear",
    "PeftFactors",
    "export_peft_adapter",
    "load_peft_adapter",
    "method_state",
]
