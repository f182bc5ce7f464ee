"""Flower strategies, one per algorithm, thin over ``fedalora``'s aggregation rules."""

from .common import LoRAStrategy
from .fedalora import FedALoRA
from .fedalora_hetero import FedALoRAHetero
from .fedit import FedIT
from .fedsa_lora import FedSALoRA
from .ffa_lora import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA
from .local import LocalOnly
from .zeropad import ZeroPadding

#: run-config ``strategy`` -> strategy class (keys match fedalora.sharing.SHARING).
STRATEGIES: dict[str, type[LoRAStrategy]] = {
    "fedalora": FedALoRA,
    "fedalora-hetero": FedALoRAHetero,
    "fedit": FedIT,
    "zeropad": ZeroPadding,
    "hetlora": HetLoRA,
    "ffa-lora": FFALoRA,
    "fedsa-lora": FedSALoRA,
    "flexlora": FlexLoRA,
    "flora": FLoRA,
    "local": LocalOnly,
}

__all__ = ["STRATEGIES", "FFALoRA", "FLoRA", "FedALoRA", "FedALoRAHetero", "FedIT",
           "FedSALoRA", "FlexLoRA", "HetLoRA", "LocalOnly", "LoRAStrategy", "ZeroPadding"]
