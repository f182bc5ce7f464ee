"""What each built-in method moves and keeps, written out independently of the code
from each method's paper (its module docstring states the same): one row per method.
A method added to ``fedalora.methods`` needs its row here; the tests check that."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    """One d_out x d_in layer seen by a client of ``rank`` in ``server_round``;
    ``ranks``: every client's rank in the last aggregate; ``first``: before the first
    aggregation."""

    rank: int
    ranks: list[int]
    d_out: int
    d_in: int
    d_m: int
    first: bool
    server_round: int

    @property
    def both(self) -> int:  # A and B at the client's rank
        return self.rank * (self.d_in + self.d_out)

    @property
    def padded(self) -> int:  # A and B at the largest rank
        return max(self.ranks) * (self.d_in + self.d_out)


@dataclass(frozen=True)
class Facts:
    """The tensors the server's shared state holds, those that never leave a client,
    and the floats a client sends up and receives down, per adapted layer."""

    shared: frozenset[str]
    private: frozenset[str]
    up: Callable[[Layer], int]
    down: Callable[[Layer], int]


ORACLE: dict[str, Facts] = {
    "fedalora": Facts(
        frozenset({"lora_B"}),
        frozenset({"lora_A"}),
        lambda x: x.d_out * x.rank,
        lambda x: x.d_out * x.rank,
    ),
    "fedalora-hetero": Facts(
        frozenset({"B0"}),
        frozenset({"A", "M"}),
        lambda x: x.d_out * x.rank + x.rank * x.d_m,
        lambda x: x.d_out * x.d_m,
    ),
    "fedit": Facts(
        frozenset({"lora_A", "lora_B"}), frozenset(), lambda x: x.both, lambda x: x.both
    ),
    "zeropad": Facts(
        frozenset({"lora_A", "lora_B"}), frozenset(), lambda x: x.both, lambda x: x.padded
    ),
    "hetlora": Facts(
        frozenset({"lora_A", "lora_B"}), frozenset(), lambda x: x.both, lambda x: x.padded
    ),
    "ffa-lora": Facts(
        frozenset({"lora_B"}), frozenset(), lambda x: x.d_out * x.rank, lambda x: x.d_out * x.rank
    ),
    "fedsa-lora": Facts(
        frozenset({"lora_A"}),
        frozenset({"lora_B"}),
        lambda x: x.rank * x.d_in,
        lambda x: x.rank * x.d_in,
    ),
    "flexlora": Facts(
        frozenset({"lora_A", "lora_B"}), frozenset(), lambda x: x.both, lambda x: x.both
    ),
    "flora": Facts(
        frozenset({"stack_A", "stack_B"}),
        frozenset(),
        lambda x: x.both,
        lambda x: 0 if x.first else sum(x.ranks) * (x.d_in + x.d_out),
    ),
    "fedex-lora": Facts(
        frozenset({"lora_A", "lora_B", "residual"}),
        frozenset(),
        lambda x: x.both,
        lambda x: x.both + (0 if x.first else x.d_out * x.d_in),
    ),
    "fedrot-lora": Facts(
        frozenset({"lora_A", "lora_B"}), frozenset(), lambda x: x.both, lambda x: x.both
    ),
    "flora-na": Facts(
        frozenset({"lora_A", "lora_B"}), frozenset(), lambda x: x.both, lambda x: x.both
    ),
    "local": Facts(frozenset(), frozenset({"lora_A", "lora_B"}), lambda x: 0, lambda x: 0),
    "lora-fair": Facts(
        frozenset({"lora_A", "lora_B"}), frozenset(), lambda x: x.both, lambda x: x.both
    ),
    "rolora": Facts(  # B in odd rounds, A in even ones; both come down
        frozenset({"lora_A", "lora_B"}),
        frozenset(),
        lambda x: x.d_out * x.rank if x.server_round % 2 else x.rank * x.d_in,
        lambda x: x.both,
    ),
    "sdflora": Facts(  # the global module, rank global-rank (1 in the tiny runs)
        frozenset({"global_A", "global_B"}),
        frozenset({"lora_A", "lora_B"}),
        lambda x: x.d_in + x.d_out,
        lambda x: x.d_in + x.d_out,
    ),
    "masa": Facts(
        frozenset({"lora_B"}),
        frozenset({"bank", "mix"}),
        lambda x: x.d_out * x.rank,
        lambda x: x.d_out * x.rank,
    ),
    # LoRI-D (the suites' tiny runs set lori-sparsity=0; LoRI-S is tested on its own)
    "lori": Facts(
        frozenset({"lora_B"}), frozenset(), lambda x: x.d_out * x.rank, lambda x: x.d_out * x.rank
    ),
}


def floats_per_layer(name: str, direction: str, layer: Layer) -> int:
    """Floats one client sends ("up") or receives ("down") for one layer."""
    facts = ORACLE[name]
    return (facts.up if direction == "up" else facts.down)(layer)
