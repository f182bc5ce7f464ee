"""The LoRA scale s of a client of rank r, one rule for client and server alike."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import require
from .settings import Section, setting

#: run-config ``scaling``: s = alpha; s = alpha / r (PEFT's default); s = alpha / sqrt(r)
#: (rsLoRA: Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with
#: LoRA", arXiv:2312.03732).
SCALINGS = ("constant", "alpha-over-rank", "rslora")


@dataclass(frozen=True)
class LoRAScaling(Section):
    """``rule`` (one of ``SCALINGS``) with ``alpha``: the scale s(r) and the PEFT
    ``LoraConfig`` fields that make PEFT apply exactly that scale."""

    title = "LoRA scale"

    rule: str = setting(
        "scaling",
        "constant",
        "LoRA scale s: `constant` s = lora-alpha (the reference code's alpha = 2r); "
        "`alpha-over-rank` s = alpha / r (PEFT's default); `rslora` s = alpha / sqrt(r) "
        "(PEFT's `use_rslora`). The same s is used in training, in the server's rules and "
        "in the exported adapter",
    )
    alpha: float = setting("lora-alpha", 2.0, "alpha of the `scaling` rule")

    def validate(self) -> None:
        require(self.alpha > 0, "lora-alpha", "must be positive")
        require(self.rule in SCALINGS, "scaling", f"choose one of: {', '.join(SCALINGS)}")

    def scale(self, rank: int) -> float:
        """s(rank), as the client applies it and the server reconstructs it."""
        if self.rule == "constant":
            return self.alpha
        if self.rule == "alpha-over-rank":
            return self.alpha / rank
        return self.alpha / math.sqrt(rank)

    def peft_fields(self, rank: int) -> dict[str, Any]:
        """``lora_alpha`` and ``use_rslora`` for PEFT's ``LoraConfig`` at ``rank``."""
        if self.rule == "constant":
            return {"lora_alpha": self.alpha * rank, "use_rslora": False}
        return {"lora_alpha": self.alpha, "use_rslora": self.rule == "rslora"}
