"""Client-side adapters: the layer math and its wiring into a model."""

from .decomposed import DecomposedLoRALinear
from .wiring import (
                     ClientAdapter,
                     DecomposedAdapter,
                     LoRAAdapter,
                     export_peft_adapter,
                     load_peft_adapter,
)

__all__ = ["ClientAdapter", "DecomposedAdapter", "DecomposedLoRALinear", "LoRAAdapter",
           "export_peft_adapter", "load_peft_adapter"]
