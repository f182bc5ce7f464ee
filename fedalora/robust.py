"""Robust federation without DP: how much each client's claim weighs, and aggregates that
one hostile update cannot steer. Pure functions over numpy arrays (no Flower, no model).

**Weights** (run-config ``weights``). A client's example count is a claim the server
cannot check. ``examples`` weighs each client by its claim n_i (FedAvg); ``uniform``
weighs every client equally; ``examples-capped`` weighs by min(n_i, c * median(n)), with
c = ``weight-cap``, so that no claim outweighs c median clients. Under every policy a
claim above c times the median, or below the median over c, is reported.

**Aggregation** (run-config ``aggregation``, ``trim-fraction``, ``clip-norm``), for the
methods whose rule is the shared state plus a mean of per-client updates (those that
client-level DP can protect, ``Method.dp_refusal``). Each client's update delta_i is its
method's ``shared_delta`` in the coordinates of the shared state, a leading block of
each shared array (a client of a lower rank holds fewer rows or columns), as in
DP-FedAvg's step (``fedalora.privacy``). Per entry, over the clients whose block holds
it (FFA-LoRA's own rule at mixed ranks counts a slot a client lacks as zero instead):

- ``method``: the weighted mean (the method's own rule);
- ``median``: the coordinate-wise median (Yin et al., "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498; Flower's
  ``FedMedian``);
- ``trimmed-mean``: the mean after dropping floor(beta h) of the h values at each end,
  beta = ``trim-fraction`` (same paper; Flower's ``FedTrimmedAvg``, scipy's
  ``trim_mean``).

Flower's ``FedMedian`` and ``FedTrimmedAvg`` stack whole arrays of one shape from every
client (and this core imports no Flower); here blocks differ by rank, so the same
statistics run over a stack padded with NaN outside each client's block. Flower's
``Krum`` and ``Bulyan`` select whole updates by their pairwise distances and are not
offered. ``clip-norm`` > 0 first scales each delta_i to L2 norm at
most that bound (over all layers; as DP-FedAvg's clipping, without noise). Median and
trimmed mean weigh clients equally, as Flower's strategies do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import require
from .privacy import clip_to_norm, leading_block
from .settings import Section, setting
from .types import Arrays

#: run-config ``weights``.
EXAMPLES, UNIFORM, EXAMPLES_CAPPED = "examples", "uniform", "examples-capped"
WEIGHTS = (EXAMPLES, UNIFORM, EXAMPLES_CAPPED)
#: run-config ``aggregation``.
METHOD_RULE, MEDIAN, TRIMMED_MEAN = "method", "median", "trimmed-mean"
AGGREGATIONS = (METHOD_RULE, MEDIAN, TRIMMED_MEAN)


@dataclass(frozen=True)
class RobustSettings(Section):
    """Run-config ``weights``, ``weight-cap``, ``aggregation``, ``trim-fraction`` and
    ``clip-norm`` (0: no clipping)."""

    title = "Robust aggregation"

    weights: str = setting(
        "weights",
        EXAMPLES,
        "how much each client weighs in the aggregate: `examples` (its claimed example "
        "count, FedAvg), `uniform`, `examples-capped` (its claim, capped at `weight-cap` "
        "times the median claim)",
    )
    weight_cap: float = setting(
        "weight-cap",
        4.0,
        "the cap of `examples-capped`; a claim above this many times the median (or below "
        "the median over it) is logged under every policy",
    )
    aggregation: str = setting(
        "aggregation",
        METHOD_RULE,
        "`method` (the method's rule), `median` or `trimmed-mean`: a coordinate-wise "
        "statistic of the clients' updates instead of their mean (linear methods only, no DP)",
    )
    trim_fraction: float = setting(
        "trim-fraction", 0.1, "the share of clients `trimmed-mean` cuts at each end, entry by entry"
    )
    clip_norm: float = setting(
        "clip-norm",
        0.0,
        "> 0: each client's update is clipped to this L2 norm before it is aggregated "
        "(linear methods, no DP); 0 = off",
    )

    def validate(self) -> None:
        require(
            self.weights in WEIGHTS,
            "weights",
            f"choose one of: {', '.join(WEIGHTS)} (how much a client's claimed example "
            "count weighs in the aggregate)",
        )
        require(
            self.weight_cap > 1 and math.isfinite(self.weight_cap),
            "weight-cap",
            "must be > 1 (a claim weighs at most this many times the median claim)",
        )
        require(
            self.aggregation in AGGREGATIONS,
            "aggregation",
            f"choose one of: {', '.join(AGGREGATIONS)} (the method's rule, or a "
            "coordinate-wise robust statistic of the clients' updates)",
        )
        require(
            0 <= self.trim_fraction < 0.5,
            "trim-fraction",
            "must be in [0, 0.5) (the share of clients cut at each end, entry by entry)",
        )
        require(
            self.clip_norm >= 0 and math.isfinite(self.clip_norm),
            "clip-norm",
            "must be >= 0 (the L2 bound on each client's update; 0: no clipping)",
        )

    @property
    def replaces_rule(self) -> bool:
        """Whether the server aggregates clients' deltas instead of calling the method's
        rule (a robust statistic, or clipping)."""
        return self.aggregation != METHOD_RULE or self.clip_norm > 0


def claim_weights(claims: Sequence[int], policy: str, cap: float) -> list[int]:
    """The aggregation weight of each claimed example count under ``policy``: the
    claim, 1, or the claim capped at floor(cap * median claim) (at least 1)."""
    if policy == UNIFORM:
        return [1] * len(claims)
    if policy == EXAMPLES_CAPPED:
        bound = max(1, int(cap * float(np.median(claims))))
        return [min(int(n), bound) for n in claims]
    return [int(n) for n in claims]


def outlying_claims(claims: Sequence[int], cap: float) -> list[int]:
    """Indices of the claims above ``cap`` times the median claim or below the median
    over ``cap`` (needs 3 claims, so that the median means something)."""
    if len(claims) < 3:
        return []
    median = float(np.median(claims))
    return [i for i, n in enumerate(claims) if n > cap * median or n * cap < median]


def robust_step(
    shared: Mapping[str, np.ndarray],
    deltas: Sequence[Mapping[str, np.ndarray]],
    blocks: Sequence[Mapping[str, tuple[int, ...]]],
    weights: Sequence[float],
    settings: RobustSettings,
) -> Arrays:
    """X <- X + rule_i(delta_i) entry by entry for every shared array X.

    ``deltas[i]`` maps shared keys to blocks of shape ``blocks[i][key]`` that start at
    the array's first entry; ``weights[i]`` weighs client i in the mean. Entries no
    client holds stay as they are. float64 arithmetic, float32 results.
    """
    if settings.clip_norm > 0:
        deltas = [clip_to_norm(d, settings.clip_norm) for d in deltas]
    result: Arrays = {}
    for key, current in shared.items():
        stack = np.full((len(deltas), *current.shape), np.nan)
        for row, (delta, block) in enumerate(zip(deltas, blocks, strict=True)):
            stack[row][leading_block(block[key], current.shape)] = delta[key]
        step = coordinate_rule(stack, np.asarray(weights, np.float64), settings)
        result[key] = (np.asarray(current, np.float64) + step).astype(np.float32)
    return result


def coordinate_rule(stack: np.ndarray, weights: np.ndarray, settings: RobustSettings) -> np.ndarray:
    """The per-entry statistic over axis 0 of ``stack``, where NaN marks an entry the
    client does not hold; 0 where no client holds it."""
    held = ~np.isnan(stack)
    count = held.sum(axis=0)
    some = count > 0
    if settings.aggregation == MEDIAN:
        # every NaN column filled with 0s, so that numpy need not warn about it
        return np.where(some, np.nanmedian(np.where(some, stack, 0.0), axis=0), 0.0)
    if settings.aggregation == TRIMMED_MEAN:
        cut = np.floor(settings.trim_fraction * count).astype(int)
        ordered = np.sort(stack, axis=0)  # NaN sorts last
        position = np.arange(stack.shape[0]).reshape(-1, *([1] * (stack.ndim - 1)))
        kept = (position >= cut) & (position < count - cut)
        total = np.where(kept, ordered, 0.0).sum(axis=0)
        return np.divide(total, count - 2 * cut, out=np.zeros_like(total), where=some)
    w = np.where(held, weights.reshape(-1, *([1] * (stack.ndim - 1))), 0.0)
    total = (w * np.where(held, stack, 0.0)).sum(axis=0)
    return np.divide(total, w.sum(axis=0), out=np.zeros_like(total), where=some)
