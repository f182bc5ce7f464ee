"""Helpers of the methods that move PEFT LoRA factors (``<module>.lora_A``, r x d_in,
and ``<module>.lora_B``, d_out x r), and the base of those that only average them."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch

from ..adapters import ClientAdapter
from ..adapters.lora import LORA_A, LORA_B
from ..aggregation import weighted_average
from ..types import Arrays, LayerShapes
from ..variants import MAGNITUDE
from .base import Method, Participant

#: The LoRA variants a plain PEFT LoRA client takes.
EVERY_VARIANT = frozenset({"dora", "lora-plus-ratio", "lora-init", "lora-fa"})


def seeded_lora_a(seed: int, module: str, rank: int, d_in: int) -> np.ndarray:
    """A shared LoRA A (rank x d_in) that every party can regenerate from ``seed``.

    Kaiming-uniform with a = sqrt(5), PEFT's init for lora_A: U(-1/sqrt(d_in), 1/sqrt(d_in)).
    Rows are drawn in order, so the first r rows do not depend on ``rank``: a rank-r
    client's A is the first r rows of the rank-r_max A.
    """
    rng = np.random.default_rng([seed, zlib.crc32(module.encode())])
    bound = 1.0 / math.sqrt(d_in)
    return rng.uniform(-bound, bound, size=(rank, d_in)).astype(np.float32)


def initial_lora(
    layers: LayerShapes, rank: int, seed: int, factors: tuple[str, ...] = (LORA_A, LORA_B)
) -> Arrays:
    """The global LoRA init a server broadcasts: A = ``seeded_lora_a``, B = 0 (and DoRA's
    magnitude, which the clients derive themselves before the first aggregation)."""
    arrays: Arrays = {}
    for m, (d_out, d_in) in layers.items():
        if LORA_A in factors:
            arrays[f"{m}.{LORA_A}"] = seeded_lora_a(seed, m, rank, d_in)
        if LORA_B in factors:
            arrays[f"{m}.{LORA_B}"] = np.zeros((d_out, rank), np.float32)
        if MAGNITUDE in factors:  # a placeholder: every client derives its own in round 1
            arrays[f"{m}.{MAGNITUDE}"] = np.ones(d_out, np.float32)
    return arrays


def padded_rank(shared: Mapping[str, np.ndarray]) -> int:
    """The rank that LoRA factors padded to a common rank have (rows of A, columns of B)."""
    key, value = next(iter(shared.items()))
    return int(value.shape[0] if key.endswith(LORA_A) else value.shape[1])


def freeze_seeded_a(adapter: ClientAdapter, seed: int) -> ClientAdapter:
    """Set every ``lora_A`` of a PEFT LoRA adapter to the first rows of the shared
    ``seeded_lora_a`` and freeze it; returns the adapter."""
    tensors = adapter.tensors()
    with torch.no_grad():
        for m in adapter.targets:
            weight = tensors[f"{m}.{LORA_A}"]
            rank, d_in = weight.shape
            weight.copy_(torch.from_numpy(seeded_lora_a(seed, m, rank, d_in)))
            weight.requires_grad_(False)
    return adapter


class FactorAveraging(Method):
    """A method of one rank whose shared factors (``downloads``) start from the seeded
    global init (A = ``seeded_lora_a``, B = 0) and are averaged with the clients'
    weights, FedAvg's rule; the others stay private. A subclass names what moves."""

    accepts = EVERY_VARIANT
    nonlinear_reason: ClassVar[str | None] = None

    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        return initial_lora(layers, max(ranks), self.seed, self.downloads)

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        return weighted_average(updates, [c.num_examples for c in clients])
