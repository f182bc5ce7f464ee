"""LoRA variants a client's PEFT LoRA layer can take, each through PEFT's own code.

- DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024,
  arXiv:2402.09353): ``dora``; PEFT's ``use_dora``. Its magnitude vector m (d_out per
  layer) is kept private or shared with B (``dora-magnitude``): shared, it travels and
  is averaged as the method averages B.
- LoRA+ (Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML
  2024, arXiv:2402.12354): ``lora-plus-ratio``, B's learning rate over A's; PEFT's
  ``create_loraplus_optimizer``.
- PiSSA (Meng et al., "PiSSA: Principal Singular Values and Singular Vectors
  Adaptation of Large Language Models", NeurIPS 2024, arXiv:2404.02948) and OLoRA
  (Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
  arXiv:2406.01775): ``lora-init``; PEFT's ``init_lora_weights``. Every party derives
  the same init from the same base, and the base weight of each adapted layer becomes
  the same residual everywhere; so in round 1 a client keeps the factors it derived
  rather than the server's placeholder, and its exported adapter (on the plain base)
  subtracts the initial principal part again (rank 2r, exact).
- LoRA-FA (Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for Large
  Language Models Fine-tuning", arXiv:2308.03303): ``lora-fa``; A frozen and B trained
  with PEFT's ``create_lorafa_optimizer``.
- rsLoRA is ``scaling='rslora'`` (``fedalora.scaling``).

A method lists the variant keys it accepts (``Method.accepts``); the configuration
refuses the others, naming the methods that take them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import require
from .settings import Section, setting

#: run-config ``lora-init``: PEFT's default init, or a principal one.
LORA_INITS = ("default", "pissa", "olora")
DORA_MAGNITUDES = ("private", "shared")
#: The adapter tensor of DoRA's magnitude vector (d_out), beside ``lora_A``/``lora_B``.
MAGNITUDE = "lora_magnitude"
#: The variants whose clients train one after another in a cohort, and why.
UNBATCHED = {
    "dora": "DoRA rescales each output by the norm of the client's own W0 + s B A",
    "lora-init": "a principal init (PiSSA, OLoRA) gives each client its own residual base",
}


@dataclass(frozen=True)
class Variants(Section):
    """The LoRA variants of a run; the defaults are plain LoRA."""

    title = "LoRA variants"

    dora: bool = setting("dora", False, "DoRA (PEFT's `use_dora`)")
    dora_magnitude: str = setting(
        "dora-magnitude",
        "private",
        "DoRA's magnitude vector kept on the client (`private`) or `shared` with B",
    )
    lora_plus_ratio: float = setting(
        "lora-plus-ratio",
        1.0,
        "LoRA+: B's learning rate over A's (PEFT's `create_loraplus_optimizer`); 1 = off",
    )
    lora_init: str = setting(
        "lora-init",
        "default",
        "`pissa` or `olora`: a principal init every party derives from the base (PEFT's "
        "`init_lora_weights`)",
    )
    lora_fa: bool = setting(
        "lora-fa",
        False,
        "LoRA-FA: A frozen, B trained with the projected gradient (PEFT's "
        "`create_lorafa_optimizer`)",
    )

    def validate(self) -> None:
        require(
            self.dora_magnitude in DORA_MAGNITUDES,
            "dora-magnitude",
            f"choose one of: {', '.join(DORA_MAGNITUDES)} (DoRA's magnitude vector kept "
            "on the client, or shared and averaged with B)",
        )
        require(
            self.lora_plus_ratio >= 1.0,
            "lora-plus-ratio",
            "must be >= 1 (B's learning rate over A's; 1 turns LoRA+ off; about 16 in "
            "the LoRA+ paper)",
        )
        require(
            self.lora_init in LORA_INITS, "lora-init", f"choose one of: {', '.join(LORA_INITS)}"
        )
        require(
            not (self.dora and self.lora_init != "default"),
            "lora-init",
            "a principal init (pissa, olora) does not combine with dora here; choose one",
        )
        require(
            not (self.lora_fa and self.lora_plus_ratio != 1.0),
            "lora-fa",
            "LoRA-FA and LoRA+ are two optimisers; choose one (lora-fa=false or lora-plus-ratio=1)",
        )

    def chosen(self) -> list[str]:
        """The run-config keys of the variants that are on."""
        on = {
            "dora": self.dora,
            "lora-plus-ratio": self.lora_plus_ratio != 1.0,
            "lora-init": self.lora_init != "default",
            "lora-fa": self.lora_fa,
        }
        return [key for key, value in on.items() if value]

    def cohort_problem(self) -> str | None:
        """Why a client with these variants cannot share a cohort's batched pass over the
        frozen base (``fedalora.cohort``), or None."""
        for key, problem in UNBATCHED.items():
            if key in self.chosen():
                return problem
        return None

    def shared(self) -> tuple[str, ...]:
        """Adapter tensors the variants add to what the method shares."""
        return (MAGNITUDE,) if self.dora and self.dora_magnitude == "shared" else ()

    def private(self) -> tuple[str, ...]:
        """Adapter tensors the variants add to what a client keeps."""
        return (MAGNITUDE,) if self.dora and self.dora_magnitude == "private" else ()

    def client_initialised(self) -> tuple[str, ...]:
        """Adapter tensors whose round-1 value every client derives from the base."""
        return ((MAGNITUDE,) if self.dora else ()) + (
            ("lora_A", "lora_B") if self.lora_init != "default" else ()
        )
