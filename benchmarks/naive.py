"""Per-round time of this client against a naive client that rebuilds everything.

Ours: one ``FederatedClient`` per worker keeps the base model and its tokenised data
between rounds; each round builds the adapter on the shared base weights, trains and
evaluates. Naive, as the common Flower LLM examples do in ``client_fn``: every round
loads the model from disk, reloads and repartitions the data set and tokenises the
partition (all caches cleared), then trains and evaluates the same way. Same client,
configuration and rounds: the default configuration's first client (MiniLM, BBC News
Dirichlet 0.5 over 8 clients, rank 64, 10 steps of batch 16, 64 tokens). The first,
cold round of each is reported apart; ``speedup`` is the ratio of the medians of
the warm rounds.

    python benchmarks/naive.py [--rounds 4] [--run-config "model='smollm2' ..."]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import federation, machine, print_figures

from fedalora import data, models
from fedalora.client import FederatedClient
from fedalora.config import FedConfig
from fedalora.data import partitioning
from fedalora.run_config import parse_run_config

PARTITION, NUM_CLIENTS = 0, 8


def clear_caches() -> None:
    """Forget every per-worker cache: the next client loads model and data from disk."""
    for cached in (
        models.cached_base_model,
        data.load_labelled_dataset,
        data.load_client_data,
        data.load_official_test,
        partitioning._cached_partitioner,
    ):
        cached.cache_clear()


def run(config: FedConfig, rounds: int, naive: bool) -> list[float]:
    """Seconds of each round (the first includes the cold start for both clients); the
    client trains and evaluates from the strategy's initial shared state every round."""
    clear_caches()
    seconds, private, client = [], None, None
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        if naive:
            clear_caches()
        if naive or client is None:
            client = FederatedClient(config, PARTITION, NUM_CLIENTS, config.run.rank_for(PARTITION))
            shared = federation([client])[1]
        private = client.train(shared, private, server_round).private
        _, private = client.evaluate(shared, private)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--run-config",
        default="",
        help="overrides of the default "
        "configuration, e.g. \"model='smollm2' dataset='instructions' "
        "partitioning='task' batch-size=4\"",
    )
    args = parser.parse_args()
    print(f"machine: {machine()}")
    config = FedConfig.from_run_config(parse_run_config(args.run_config))
    ours = run(config, args.rounds, naive=False)
    naive = run(config, args.rounds, naive=True)
    for name, seconds in (("ours", ours), ("naive", naive)):
        print(
            f"{name}: cold round {seconds[0]:.2f} s, warm rounds "
            f"{[round(s, 2) for s in seconds[1:]]} s"
        )
    ours_round, naive_round = statistics.median(ours[1:]), statistics.median(naive[1:])
    print_figures(
        ours_round_seconds=ours_round,
        naive_round_seconds=naive_round,
        speedup=naive_round / ours_round,
    )


if __name__ == "__main__":
    main()
