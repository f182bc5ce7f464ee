"""The method strategy under client-level differential privacy (``fedalora.privacy``):
DP-FedAvg's noisy mean of the clipped updates replaces the method's rule, and an
accountant follows epsilon round by round, as Flower's DP wrappers do for FedAvg."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore import log

from fedalora.checkpoint import Checkpoint
from fedalora.config import FedConfig
from fedalora.errors import ConfigError
from fedalora.outputs import RunRecorder
from fedalora.privacy import (
    CENTRAL,
    NOISE_STREAM,
    ClientLevelAccountant,
    PrivacyLedger,
    private_mean_update,
)
from fedalora.types import Arrays, LayerShapes

from .discovery import Node
from .method_strategy import MethodStrategy
from .protocol import CONFIG, client_ids
from .screening import PrivateReplyScreen

LEDGER = "privacy"


class PrivateMethodStrategy(MethodStrategy):
    """A linear method (``Method.dp_refusal`` None) with clipped client updates, Gaussian noise
    on their sum (central mode) or on each of them (local mode), equal weights, and
    epsilon at ``dp-delta`` in every rounds.jsonl row and in summary.json (with a warning
    and ``dp_delta_too_large`` when that delta is not well below 1/N).

    With ``dp-target-epsilon`` the run is planned to end at the last round whose
    epsilon stays within it; a retried round spends budget too, and the run then stops
    before the attempt that would pass the target."""

    def __init__(
        self, config: FedConfig, layer_shapes: LayerShapes, recorder: RunRecorder | None = None
    ) -> None:
        super().__init__(config, layer_shapes, recorder)
        self.dp = config.dp
        self.screen = PrivateReplyScreen(self.method, self.layer_shapes, self.dp)
        self.ledger = PrivacyLedger()
        self.accountant = ClientLevelAccountant(self.dp.noise_multiplier, 0.0, 0, 0)

    def connect(self, nodes: Iterable[Node]) -> ArrayRecord:
        arrays = super().connect(nodes)
        num_clients = len(self.clients)
        self.accountant = ClientLevelAccountant(
            self.dp.noise_multiplier,
            self.dp.delta_for(num_clients),
            num_clients,
            self.sample_size(self.config.run.fraction_train),
            self.dp.mode,
        )
        self.ledger = PrivacyLedger()
        self.num_rounds = self._rounds_within_budget()
        if problem := self.dp.delta_problem(num_clients):
            log(WARNING, "%s", problem)
        return arrays

    def restore(self, checkpoint: Checkpoint) -> ArrayRecord:
        arrays = super().restore(checkpoint)
        if LEDGER not in checkpoint.strategy:
            raise ConfigError(
                "resume",
                "the checkpoint has no privacy ledger (it was written without DP); "
                "resume with the interrupted run's dp-* values",
            )
        self.ledger = PrivacyLedger.from_json(checkpoint.strategy[LEDGER])
        return arrays

    def strategy_state(self) -> dict[str, Any]:
        return {LEDGER: self.ledger.to_json()}

    # ------------------------------------------------------------------ rounds
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample as the method strategy does; every sampled client's training is a
        release, whatever becomes of its reply."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.ledger.record(
            [p for m in messages for p in client_ids(m.content.config_records[CONFIG])]
        )
        return messages

    def aggregate_updates(
        self, server_round: int, updates: Sequence[Arrays], clients: Sequence[Node]
    ) -> Arrays:
        """shared + (sum of the clipped updates + central noise) / expected contributors."""
        attempt = self.tally.attempts - 1
        return private_mean_update(
            self.shared,
            updates,
            [self.method.delta_shapes(self.layer_shapes, n.rank) for n in self.clients.values()],
            self.accountant.sample_size / self.accountant.num_clients,
            self.dp.noise_std if self.dp.mode == CENTRAL else 0.0,
            self.dp.noise_rng(self.config.run.seed, server_round, attempt, NOISE_STREAM),
        )

    def stop_reason(self) -> str | None:
        target = self.dp.target_epsilon
        if not target:
            return None
        after = self.accountant.epsilon_after(self.accountant.count(self.ledger) + 1)
        if after <= target:
            return None
        return (
            f"dp-target-epsilon={target:g} reached: epsilon is "
            f"{self.accountant.epsilon(self.ledger):.4g} and one more round would make it "
            f"{after:.4g}"
        )

    def round_fields(self) -> dict[str, Any]:
        return {
            "epsilon": self.accountant.epsilon(self.ledger),
            "dp_releases": self.ledger.releases,
        }

    def summary_fields(self) -> dict[str, Any]:
        return {
            "epsilon": self.accountant.epsilon(self.ledger),
            "dp_delta": self.accountant.delta,
            "dp_delta_too_large": self.dp.delta_problem(self.accountant.num_clients) is not None,
            "dp_mode": self.dp.mode,
            "dp_noise_multiplier": self.dp.noise_multiplier,
            "dp_clip": self.dp.clip,
            "dp_sample_size": self.accountant.sample_size,
        }

    def summary(self) -> None:
        super().summary()
        log(
            INFO,
            "\t├──> client-level DP (%s): clip %g, noise multiplier %g, delta %.3g, "
            "%d of %d clients per round; epsilon after %d rounds: %.4g",
            self.dp.mode,
            self.dp.clip,
            self.dp.noise_multiplier,
            self.accountant.delta,
            self.accountant.sample_size,
            self.accountant.num_clients,
            self.num_rounds,
            self.accountant.epsilon_after(self.num_rounds),
        )

    # ----------------------------------------------------------------- helpers
    def _rounds_within_budget(self) -> int:
        """num-server-rounds, or fewer: the most rounds (one release each) whose epsilon
        stays within ``dp-target-epsilon``; ConfigError if not even one does."""
        target, planned = self.dp.target_epsilon, self.config.run.num_server_rounds
        if not target:
            return planned
        epsilons = [self.accountant.epsilon_after(k) for k in range(1, planned + 1)]
        rounds = bisect.bisect_right(epsilons, target)
        if rounds == 0:
            raise ConfigError(
                "dp-target-epsilon",
                f"one round already costs epsilon {epsilons[0]:.4g} > {target:g}; raise "
                "dp-target-epsilon or dp-noise-multiplier, or lower fraction-train",
            )
        if rounds < planned:
            self.stopped = (
                f"dp-target-epsilon={target:g} allows {rounds} of the {planned} rounds "
                f"(epsilon {epsilons[rounds - 1]:.4g} after round {rounds}, "
                f"{epsilons[rounds]:.4g} after {rounds + 1})"
            )
            log(WARNING, "%s; the run ends after round %d", self.stopped, rounds)
        return rounds


def make_strategy(
    config: FedConfig, layer_shapes: LayerShapes, recorder: RunRecorder | None = None
) -> MethodStrategy:
    """The strategy of ``config``: private under client-level DP, else the method's."""
    kind = PrivateMethodStrategy if config.dp.enabled else MethodStrategy
    return kind(config, layer_shapes, recorder)
