"""Flower strategies, one per algorithm, thin over ``fedalora``'s aggregation rules."""

from .common import LoRAStrategy
from .fedalora import FedALoRA
from .fedalora_hetero import FedALoRAHetero

#: run-config ``strategy`` -> strategy class (keys match fedalora.config.STRATEGY_ADAPTERS).
STRATEGIES: dict[str, type[LoRAStrategy]] = {
    "fedalora": FedALoRA,
    "fedalora-hetero": FedALoRAHetero,
}

__all__ = ["STRATEGIES", "FedALoRA", "FedALoRAHetero", "LoRAStrategy"]
