"""Federated LoRA methods, one module each, in one registry (``registry``).

Importing this package registers the built-in methods. ``base`` defines what a method
declares; ``lora_factors`` holds the helpers of those that move PEFT LoRA factors.
"""

from . import (  # noqa: F401 - importing a method module registers it
    fedalora,
    fedalora_hetero,
    fedit,
    fedsa_lora,
    ffa_lora,
    flexlora,
    flora,
    hetlora,
    local,
    lori,
    masa,
    zeropad,
)
from .base import Method, MethodOptions, Paper, Participant
from .registry import method_class, register_method, registered_methods

__all__ = [
    "Method",
    "MethodOptions",
    "Paper",
    "Participant",
    "method_class",
    "register_method",
    "registered_methods",
]
