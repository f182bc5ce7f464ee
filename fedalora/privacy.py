"""Client-level differential privacy for the shared updates: DP-FedAvg over the
shared state, for clients of any rank.

McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018
(arXiv:1710.06963). Each sampled client's update to the shared state (its method's
``shared_delta``, in the coordinates of what it downloaded) is clipped to L2 norm C
over all layers, on the client. The server places each update in the leading block of
the shared array it belongs to (zero-padding's and FFA-LoRA's rank slots; Fed-ALoRA's
d_out x d_m product needs no placing), adds Gaussian noise of standard deviation z C
to the sum, and divides every entry by the expected number of sampled clients whose
updates reach it: q H, with q = m / N the sampled share and H the clients of the
federation that hold the entry (per rank slot under zero-padding). Weights are equal:
weighting by example counts would publish the counts and give one client more than
C of influence, breaking the sensitivity bound.

Accounting (dp-accounting's RDP accountant): neighbouring federations differ in one
client's data, with N and the ranks public (replace-one). One client changes the
clipped sum by at most 2C, so the noise multiplier against that sensitivity is z / 2.
A round samples m of N clients without replacement (Wang, Balle and Kasiviswanathan,
"Subsampled Renyi Differential Privacy and Analytical Moments Accountant", AISTATS
2019, arXiv:1808.00087); every training attempt counts as a release. In ``local``
mode each client adds the noise to its own clipped update before upload: the server
is not trusted, the sampling amplifies nothing, and a client's epsilon composes the
Gaussian mechanism over the rounds it took part in (the largest over clients is
reported).
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
import numpy as np

from .errors import require
from .settings import Section, setting
from .types import Arrays

CENTRAL, LOCAL = "central", "local"
DP_MODES = (CENTRAL, LOCAL)
#: Relative slack of the server's norm check, for float32 rounding of a clipped update.
NORM_TOLERANCE = 1e-4
#: The noise's own stream in its seed (beside the run seed, the round and the client or
#: attempt), apart from every other draw of the run.
NOISE_STREAM = 0x4450
#: The largest N x delta for N clients that ``DPSettings.delta_problem`` accepts. A
#: mechanism that publishes each client's data with probability delta is (0, delta)-DP
#: and exposes about N x delta clients, so delta must be well below 1/N (at 1/N, one
#: client's data published at random satisfies it): here at most a tenth of it.
MAX_DELTA_TIMES_CLIENTS = 0.1


@dataclass(frozen=True)
class DPSettings(Section):
    """Run-config ``dp-*``: clip bound C, noise multiplier z (0: DP off), delta (0: the
    rule 1 / N^1.1), mode, target epsilon (0: none) and the noise's seed source."""

    title = "Privacy"

    clip: float = setting(
        "dp-clip",
        1.0,
        "C, the L2 bound on each client's update to the shared state, over all layers",
    )
    noise_multiplier: float = setting(
        "dp-noise-multiplier",
        0.0,
        "client-level differential privacy (see Privacy): z, the noise's standard deviation "
        "over `dp-clip`; 0 = DP off",
    )
    delta: float = setting(
        "dp-delta",
        0.0,
        "the delta of the reported epsilon; 0 = 1 / N^1.1 for N clients. A delta not well "
        "below 1/N protects little: when N x delta > 0.1 the server warns and "
        "`summary.json` says `dp_delta_too_large`; set it to at most 0.1 / N, e.g. 1e-5",
    )
    mode: str = setting(
        "dp-mode",
        CENTRAL,
        "`central` (the server adds the noise to the sum; a trusted server) or `local` "
        "(each client noises its own update before upload)",
    )
    target_epsilon: float = setting(
        "dp-target-epsilon",
        0.0,
        "end the run (completed, with the reason in `summary.json`) before its epsilon "
        "would pass this; 0 = no target",
    )
    secure_noise: bool = setting(
        "dp-secure-noise",
        False,
        "draw the noise's seed from the operating system instead of `seed` (not "
        "reproducible; use it whenever the seed is not secret)",
    )

    def validate(self) -> None:
        require(
            self.clip > 0 and math.isfinite(self.clip),
            "dp-clip",
            "must be a positive number (the L2 bound C on each client's update, over all layers)",
        )
        require(
            self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier),
            "dp-noise-multiplier",
            "must be >= 0 (z: the noise's standard deviation is z * dp-clip; 0 turns DP off)",
        )
        require(0 <= self.delta < 1, "dp-delta", "must be in [0, 1) (0: 1 / number of clients^1.1)")
        require(self.mode in DP_MODES, "dp-mode", f"choose one of: {', '.join(DP_MODES)}")
        require(
            self.target_epsilon >= 0,
            "dp-target-epsilon",
            "must be >= 0 (the run stops before its epsilon would pass it; 0: no target)",
        )
        if not self.enabled:
            require(
                self.target_epsilon == 0,
                "dp-target-epsilon",
                "needs DP on: set dp-noise-multiplier > 0, or dp-target-epsilon=0",
            )

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def noise_std(self) -> float:
        """z C: the standard deviation of the noise on the sum (central) or on each
        client's update (local)."""
        return self.noise_multiplier * self.clip

    def delta_for(self, num_clients: int) -> float:
        """``dp-delta``, or 1 / N^1.1 for N clients when it is 0."""
        return self.delta or 1.0 / num_clients**1.1

    def delta_problem(self, num_clients: int) -> str | None:
        """Why the delta for ``num_clients`` clients protects little (N x delta over
        ``MAX_DELTA_TIMES_CLIENTS``, as 1 / N^1.1 always is below 10^10 clients), and
        the fix; None if it is small enough."""
        delta = self.delta_for(num_clients)
        if num_clients * delta <= MAX_DELTA_TIMES_CLIENTS:
            return None
        name = f"dp-delta={delta:.3g}" if self.delta else f"delta 1/N^1.1 = {delta:.3g}"
        return (
            f"{name} is not well below 1/N for N={num_clients} clients (N x delta = "
            f"{num_clients * delta:.2g}): a mechanism that publishes each client's data "
            "with probability delta meets it, so the reported epsilon protects little; set "
            "dp-delta to at most "
            f"{MAX_DELTA_TIMES_CLIENTS:g}/N = {MAX_DELTA_TIMES_CLIENTS / num_clients:.2g}, "
            "e.g. 1e-5 (more clients do not help at a fixed dp-delta)"
        )

    def noise_rng(self, *stream: int) -> np.random.Generator:
        """The noise's generator: seeded by ``stream`` (run seed, round, ...) so that a
        simulation is reproducible, or from the operating system's entropy with
        ``dp-secure-noise`` (then the noise cannot be recomputed by anyone who knows the
        seed: use it whenever the seed is not secret)."""
        entropy = secrets.randbits(128) if self.secure_noise else list(stream)
        return np.random.default_rng(entropy)

    def client_upload(self, update: Arrays, rng: np.random.Generator) -> Arrays:
        """What a client sends under DP: its update clipped to C, plus N(0, (z C)^2) on
        every entry in local mode."""
        clipped = clip_to_norm(update, self.clip)
        if self.mode == LOCAL:
            return add_gaussian_noise(clipped, self.noise_std, rng)
        return clipped


# ------------------------------------------------------------------ pure rules
def global_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm over every entry of every array (float64 sums)."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in arrays.values()))


def clip_to_norm(arrays: Mapping[str, np.ndarray], bound: float) -> Arrays:
    """``arrays`` scaled by min(1, bound / ||arrays||) (float32)."""
    norm = global_norm(arrays)
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: (np.asarray(v, np.float64) * factor).astype(np.float32) for k, v in arrays.items()}


def add_gaussian_noise(
    arrays: Mapping[str, np.ndarray], std: float, rng: np.random.Generator
) -> Arrays:
    """Every entry plus an independent N(0, std^2) draw, keys in sorted order (float32)."""
    return {
        k: (np.asarray(arrays[k], np.float64) + rng.normal(0.0, std, arrays[k].shape)).astype(
            np.float32
        )
        for k in sorted(arrays)
    }


def norm_problem(update: Mapping[str, np.ndarray], bound: float) -> str | None:
    """Why an update is over the clip bound (beyond float32 rounding), or None."""
    norm = global_norm(update)
    if norm > bound * (1 + NORM_TOLERANCE):
        return f"update norm {norm:.6g} exceeds dp-clip={bound:g}: the client did not clip it"
    return None


def leading_block(shape: Sequence[int], inside: Sequence[int]) -> tuple[slice, ...]:
    """The index of an array of ``shape`` placed at the start of one of shape ``inside``."""
    if len(shape) != len(inside) or any(a > b for a, b in zip(shape, inside, strict=True)):
        raise ValueError(f"an update of shape {tuple(shape)} does not fit {tuple(inside)}")
    return tuple(slice(0, n) for n in shape)


def private_mean_update(
    shared: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    holder_shapes: Sequence[Mapping[str, tuple[int, ...]]],
    sampled_share: float,
    noise_std: float,
    rng: np.random.Generator,
) -> Arrays:
    """DP-FedAvg's step: X <- X + (sum_i pad(U_i) + N(0, noise_std^2)) / (q H), entry by
    entry, for every shared array X.

    ``updates[i]`` maps shared keys to blocks that start at the array's first entry.
    ``holder_shapes`` are the blocks of every client of the federation (sampled or not):
    H counts, per entry, the clients whose block covers it, and ``sampled_share`` is q.
    Entries no client holds get no noise and stay as they are. Keys are visited in
    sorted order, so ``rng`` gives the same noise for the same input.
    """
    result: Arrays = {}
    for key in sorted(shared):
        current = np.asarray(shared[key], np.float64)
        total = np.zeros_like(current)
        for update in updates:
            block = update[key]
            total[leading_block(block.shape, current.shape)] += block
        holders = np.zeros_like(current)
        for shapes in holder_shapes:
            holders[leading_block(shapes[key], current.shape)] += 1.0
        held = holders > 0
        total[held] += rng.normal(0.0, noise_std, int(held.sum()))
        step = np.divide(total, sampled_share * holders, out=np.zeros_like(total), where=held)
        result[key] = (current + step).astype(np.float32)
    return result


# ------------------------------------------------------------------ accounting
@dataclass
class PrivacyLedger:
    """What the accountant composes, persisted in the server's checkpoint: the central
    releases (training attempts) and each client's uploads (local mode)."""

    releases: int = 0
    participations: dict[int, int] = field(default_factory=dict)

    def record(self, partition_ids: Sequence[int]) -> None:
        """One training attempt that sampled ``partition_ids``."""
        self.releases += 1
        for pid in partition_ids:
            self.participations[pid] = self.participations.get(pid, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "releases": self.releases,
            "participations": {str(k): v for k, v in sorted(self.participations.items())},
        }

    @classmethod
    def from_json(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        return cls(
            int(state["releases"]),
            {int(k): int(v) for k, v in state["participations"].items()},
        )


@dataclass(frozen=True)
class ClientLevelAccountant:
    """(epsilon, delta) of the shared updates for ``num_clients`` clients of which
    ``sample_size`` train per round, at noise multiplier z, in ``mode``."""

    noise_multiplier: float
    delta: float
    num_clients: int
    sample_size: int
    mode: str = CENTRAL

    def round_event(self) -> dp_accounting.DpEvent:
        """One round's release as dp-accounting sees it: the Gaussian mechanism at z / 2
        (sensitivity 2C under replace-one), on m of N sampled clients (central) or on one
        client's own update (local)."""
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier / 2)
        if self.mode == LOCAL or self.sample_size >= self.num_clients:
            return gaussian
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.num_clients, self.sample_size, gaussian
        )

    def count(self, ledger: PrivacyLedger) -> int:
        """Compositions of ``round_event`` so far: the releases (central), or the most
        uploads of any one client (local)."""
        if self.mode == LOCAL:
            return max(ledger.participations.values(), default=0)
        return ledger.releases

    def epsilon(self, ledger: PrivacyLedger) -> float:
        """Cumulative epsilon at ``delta`` after the ledger's releases; 0 before any."""
        return self.epsilon_after(self.count(ledger))

    def epsilon_after(self, count: int) -> float:
        """Epsilon at ``delta`` after ``count`` compositions of ``round_event`` (RDP adds
        up over compositions, so one round's RDP curve is computed once)."""
        if count == 0:
            return 0.0
        orders, one_round = _round_rdp(self.round_event())
        epsilon, _ = dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(
            orders, count * one_round, self.delta
        )
        return float(epsilon)


@functools.lru_cache(maxsize=64)
def _round_rdp(event: dp_accounting.DpEvent) -> tuple[np.ndarray, np.ndarray]:
    """dp-accounting's RDP orders and one release's RDP at each (computed once per event:
    the sampled mechanism's takes seconds)."""
    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    accountant.compose(event)
    return accountant.orders, accountant.rdp


def noise_for_epsilon(
    target_epsilon: float,
    rounds: int,
    *,
    delta: float,
    num_clients: int,
    sample_size: int,
    mode: str = CENTRAL,
) -> float:
    """The least noise multiplier z whose epsilon after ``rounds`` releases stays within
    ``target_epsilon`` (dp-accounting's calibration, within 1e-6 of z)."""

    def rounds_at(z: float) -> dp_accounting.DpEvent:
        accountant = ClientLevelAccountant(z, delta, num_clients, sample_size, mode)
        return dp_accounting.SelfComposedDpEvent(accountant.round_event(), rounds)

    return float(
        dp_accounting.mechanism_calibration.calibrate_dp_mechanism(
            lambda: dp_accounting.rdp.RdpAccountant(
                neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
            ),
            rounds_at,
            target_epsilon,
            delta,
            dp_accounting.mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0),
        )
    )
