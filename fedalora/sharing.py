"""What each strategy moves between client and server, and what each client keeps.

One table (``SHARING``) drives the client side of every strategy: which LoRA
factors a client installs from the server's message, which it uploads after
training, which it keeps to itself between rounds, and the special cases
(A frozen at a shared seeded init; a stacked update merged into the weights;
a download at the largest rank that the client truncates to its own).
The server side of each rule lives in ``strategies/`` and ``fedalora.aggregation``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

A, B = "A", "B"


@dataclass(frozen=True)
class SharingSpec:
    """The client side of one strategy."""

    #: "lora" (PEFT LoRA at the client's rank) or "decomposed" (Fed-ALoRA's
    #: DeltaW = s (B0 + B2 B1) M A, which moves B2/B1 up and B0 down).
    adapter: str = "lora"
    #: Whether clients of different ranks can take part in one federation.
    heterogeneous: bool = False
    #: LoRA factors the client installs from the server's message ("A", "B").
    download: tuple[str, ...] = ()
    #: LoRA factors the client uploads after local training.
    upload: tuple[str, ...] = ()
    #: LoRA factors the client keeps between rounds (never sent anywhere).
    private: tuple[str, ...] = ()
    #: A is fixed at the shared seeded init (``seeded_lora_a``) and never trained.
    frozen_a: bool = False
    #: The download is a stacked update that the client merges into its frozen
    #: weights; its LoRA starts fresh every round (FLoRA).
    merge: bool = False
    #: The download is padded to the largest rank; the client takes its first r_i
    #: rows of A and columns of B.
    truncate: bool = False


SHARING: dict[str, SharingSpec] = {
    "fedalora": SharingSpec(download=(B,), upload=(B,), private=(A,)),
    "fedalora-hetero": SharingSpec(adapter="decomposed", heterogeneous=True),
    "fedit": SharingSpec(download=(A, B), upload=(A, B)),
    "zeropad": SharingSpec(heterogeneous=True, download=(A, B), upload=(A, B), truncate=True),
    "hetlora": SharingSpec(heterogeneous=True, download=(A, B), upload=(A, B), truncate=True),
    "ffa-lora": SharingSpec(heterogeneous=True, download=(B,), upload=(B,), frozen_a=True),
    "fedsa-lora": SharingSpec(download=(A,), upload=(A,), private=(B,)),
    "flexlora": SharingSpec(heterogeneous=True, download=(A, B), upload=(A, B)),
    "flora": SharingSpec(heterogeneous=True, upload=(A, B), merge=True),
    "local": SharingSpec(heterogeneous=True, private=(A, B)),
}


def seeded_lora_a(seed: int, module: str, rank: int, d_in: int) -> np.ndarray:
    """A shared LoRA A (rank x d_in) that every party can regenerate from ``seed``.

    Kaiming-uniform with a = sqrt(5), PEFT's init for lora_A: U(-1/sqrt(d_in), 1/sqrt(d_in)).
    Rows are drawn in order, so the first r rows do not depend on ``rank``: a rank-r
    client's A is the first r rows of the rank-r_max A.
    """
    rng = np.random.default_rng([seed, zlib.crc32(module.encode())])
    bound = 1.0 / math.sqrt(d_in)
    return rng.uniform(-bound, bound, size=(rank, d_in)).astype(np.float32)
