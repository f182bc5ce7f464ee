"""Federated LoRA methods, one module each, in one registry (``registry``).

Importing this package registers the built-in methods. ``base`` defines what a method
declares; ``lora_factors`` holds the helpers of those that move PEFT LoRA factors.
"""

from collections.abc import Sequence

from ..errors import require
from . import (  # noqa: F401 - importing a method module registers it
    fedalora,
    fedalora_hetero,
    fedex_lora,
    fedit,
    fedrot_lora,
    fedsa_lora,
    ffa_lora,
    flexlora,
    flora,
    flora_na,
    hetlora,
    local,
    lora_fair,
    lori,
    masa,
    rolora,
    sdflora,
    zeropad,
)
from .base import Method, MethodOptions, Paper, Participant
from .fedalora import FedALoRA
from .fedalora_hetero import FedALoRAHetero
from .registry import method_class, register_method, registered_methods

#: The method a run configuration names when it names none.
DEFAULT_METHOD = FedALoRAHetero.name


def pooled_counterpart(method: type[Method], ranks: Sequence[int]) -> type[Method]:
    """The method whose adapters the centralised reference pools: the run's own when it
    declares ``pooled_reference`` (then one rank), else ALoRA's, Fed-ALoRA's PEFT LoRA at
    one rank or its decomposed layer at several (Ban and Ji, arXiv:2509.25414)."""
    one_rank = len(set(ranks)) == 1
    if method.pooled_reference:
        require(
            one_rank,
            "ranks",
            f"the centralised '{method.name}' reference ties every client's shared factor "
            "into one and needs one rank for every client, e.g. ranks='8'",
        )
        return method
    return FedALoRA if one_rank else FedALoRAHetero


__all__ = [
    "DEFAULT_METHOD",
    "Method",
    "MethodOptions",
    "Paper",
    "Participant",
    "method_class",
    "pooled_counterpart",
    "register_method",
    "registered_methods",
]
