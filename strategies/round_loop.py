"""The server's round loop: Flower's ``Strategy.start`` (train, aggregate, evaluate
each round), with the rounds resumable from any round and a failed round retried."""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from .method_strategy import MethodStrategy


def run_rounds(
    strategy: MethodStrategy,
    grid: Grid,
    *,
    first_round: int = 1,
    retries: int = 0,
    timeout: float = 3600.0,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    on_round_end: Callable[[int], None] | None = None,
) -> dict[int, MetricRecord]:
    """Rounds ``first_round`` .. ``strategy.num_rounds`` from the strategy's current
    arrays; returns each round's aggregated evaluation.

    A round whose training aggregates nothing (fewer accepted updates than the strategy
    needs) keeps the arrays and is rerun up to ``retries`` times, then skipped.
    ``on_round_end(round)`` follows each evaluation (the server's checkpoint). When the
    strategy gives a ``stop_reason`` before a training attempt (a spent privacy budget),
    the run ends there, the reason in ``strategy.stopped``.
    """
    strategy.summary()
    train_config = train_config if train_config is not None else ConfigRecord()
    evaluate_config = evaluate_config if evaluate_config is not None else ConfigRecord()
    arrays = strategy.arrays
    evaluations: dict[int, MetricRecord] = {}
    for server_round in range(first_round, strategy.num_rounds + 1):
        log(INFO, "[ROUND %d/%d]", server_round, strategy.num_rounds)
        for attempt in range(retries + 1):
            reason = strategy.stop_reason()
            if reason:
                log(WARNING, "stopping before round %d: %s", server_round, reason)
                strategy.stopped = reason
                return evaluations
            replies = grid.send_and_receive(
                strategy.configure_train(server_round, arrays, train_config, grid), timeout=timeout
            )
            aggregated, _ = strategy.aggregate_train(server_round, replies)
            if aggregated is not None:
                arrays = aggregated
                break
            if attempt < retries:
                log(WARNING, "round %d: retrying (%d of %d)", server_round, attempt + 1, retries)
        else:
            log(
                WARNING,
                "round %d skipped after %d attempts; the shared state is that of round %d",
                server_round,
                retries + 1,
                strategy.shared_round,
            )
        replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, evaluate_config, grid),
            timeout=timeout,
        )
        metrics = strategy.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            evaluations[server_round] = metrics
        if on_round_end:
            on_round_end(server_round)
    return evaluations
