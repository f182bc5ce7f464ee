"""Simulation overhead: a ``flwr run`` simulation against the same work in one loop.

Simulation: the default configuration (8 clients, ranks 64..8, ``fedalora-hetero``,
MiniLM on BBC News, 10 steps of batch 16 per round) for ``--rounds`` rounds through
``fedalora.launch.simulate``: its own SuperLink, and a fresh Ray instance that the run
starts (start-up included), timed from launch to the completed summary.json.
Plain loop: the same clients, rounds, training steps, aggregation (the method's
own ``aggregate``) and evaluations, in this one process, one client after another (the
simulation also runs one client at a time on 2 cores: 2 CPUs per client). Both
load the model and data once. Adapter export is off in both. The two must end
with the same accuracies (same seeds); the script checks it.

    python benchmarks/overhead.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, federation, machine, print_figures

from fedalora.client import FederatedClient
from fedalora.config import FedConfig
from fedalora.launch.simulate import run_simulation
from fedalora.outputs import read_jsonl

NUM_CLIENTS = 8


def plain_loop(config: FedConfig) -> tuple[float, list[float]]:
    """Seconds of the whole loop and the final accuracy of every client."""
    started = time.perf_counter()
    clients = [
        FederatedClient(config, k, NUM_CLIENTS, config.run.rank_for(k)) for k in range(NUM_CLIENTS)
    ]
    method = config.method
    participants, shared = federation(clients)
    private: list = [None] * NUM_CLIENTS
    for server_round in range(1, config.run.num_server_rounds + 1):
        uploads = []
        for k, (client, participant) in enumerate(zip(clients, participants, strict=True)):
            result = client.train(
                method.download(shared, participant),
                private[k],
                server_round,
                server_round - 1,
                final=server_round == config.run.num_server_rounds,
            )
            uploads.append(result.upload)
            private[k] = result.private
        shared = method.aggregate(shared, uploads, participants)
        accuracies = []
        for k, (client, participant) in enumerate(zip(clients, participants, strict=True)):
            metrics, private[k] = client.evaluate(
                method.download(shared, participant),
                private[k],
                server_round,
                final=server_round == config.run.num_server_rounds,
            )
            accuracies.append(metrics["accuracy"])
    return time.perf_counter() - started, accuracies


def simulation(run_config: dict[str, object], output_dir: Path) -> tuple[float, list[float]]:
    """Wall seconds of the simulation (Ray start-up included) and its final accuracies."""
    text = " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
        for k, v in run_config.items()
    )
    started = time.perf_counter()
    run_dir = run_simulation(
        ROOT,
        "overhead",
        num_supernodes=NUM_CLIENTS,
        run_config=text,
        output_dir=output_dir,
        flwr_home=output_dir / ".flwr-home",
        log_path=output_dir / "overhead.log",
    )
    seconds = time.perf_counter() - started
    rows = [
        r
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r["phase"] == "evaluate" and r["round"] == run_config["num-server-rounds"]
    ]
    return seconds, [r["accuracy"] for r in sorted(rows, key=lambda r: r["client"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    run_config = {"num-server-rounds": args.rounds, "export-adapters": False}
    config = FedConfig.from_run_config(run_config)
    loop_seconds, loop_accuracy = plain_loop(config)
    print(f"plain loop: {loop_seconds:.1f} s, final mean accuracy {np.mean(loop_accuracy):.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        sim_seconds, sim_accuracy = simulation(run_config, Path(tmp))
    print(
        f"flwr run simulation: {sim_seconds:.1f} s, final mean accuracy {np.mean(sim_accuracy):.4f}"
    )
    same = np.allclose(loop_accuracy, sim_accuracy, rtol=0, atol=1e-9)
    print(f"same final accuracies in both: {same}")
    print_figures(
        rounds=args.rounds,
        simulation_seconds=sim_seconds,
        plain_loop_seconds=loop_seconds,
        overhead_ratio=sim_seconds / loop_seconds,
        same_results=same,
    )


if __name__ == "__main__":
    main()
