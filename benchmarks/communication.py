"""Communication per client per round of every method, counted from the arrays the
methods move (not from formulas): one aggregation round on zero updates, then the
size of what each client is sent and what it uploads, as Flower records.

    python benchmarks/communication.py [--d-model 4096] [--layers 64] \
        [--ranks 64,64,32,32,16,16,8,8] [--homogeneous-rank 8] [--intermediate-rank 16]

The defaults are the paper's settings: LLaMA-2-7B, q_proj and v_proj of 32 layers
(64 adapted 4096 x 4096 layers). All adapted layers have the same shape, so one
layer is counted and multiplied by ``--layers``. Prints a Markdown table and, last,
``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedalora.config import FedConfig
from fedalora.methods import Participant, registered_methods
from strategies.protocol import payload_bytes, to_record


def per_client_floats(
    names: list[str],
    layer_shapes: dict[str, tuple[int, int]],
    ranks: list[int],
    intermediate_rank: int,
) -> list[dict]:
    """Mean floats up and down per client per round for clients of ``ranks`` (up: over
    rounds 1 and 2, for the methods that alternate what they upload; down: after the
    first aggregation); methods that need one rank are skipped when ranks differ."""
    rows = []
    base = FedConfig.from_run_config(
        {"ranks": ",".join(map(str, ranks)), "intermediate-rank": intermediate_rank}
    )
    for name in names:
        if len(set(ranks)) > 1 and not registered_methods()[name].heterogeneous:
            continue
        method = base.with_strategy(name).method
        clients = [Participant(i, r, 100) for i, r in enumerate(ranks)]
        shared = method.initial_shared(layer_shapes, ranks)
        uploads = {
            server_round: [
                method.upload_format().zeros(
                    method.upload_shapes(layer_shapes, c.rank, server_round)
                )
                for c in clients
            ]
            for server_round in (1, 2)
        }
        shared = method.aggregate(shared, uploads[1], clients)
        up = [
            payload_bytes(to_record(u)) / 4
            for round_uploads in uploads.values()
            for u in round_uploads
        ]
        down = [payload_bytes(to_record(method.download(shared, c))) / 4 for c in clients]
        rows.append(
            {
                "strategy": name,
                "ranks": ranks,
                "up": float(np.mean(up)),
                "down": float(np.mean(down)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=64, help="adapted layers in the model")
    parser.add_argument("--ranks", default="64,64,32,32,16,16,8,8")
    parser.add_argument("--homogeneous-rank", type=int, default=8)
    parser.add_argument("--intermediate-rank", type=int, default=16)
    args = parser.parse_args()
    hetero = [int(r) for r in args.ranks.split(",")]
    layer = {"layers.0.q_proj": (args.d_model, args.d_model)}
    print(
        f"Millions of floats per client per round, {args.layers} adapted "
        f"{args.d_model} x {args.d_model} layers, d_m={args.intermediate_rank}."
    )
    figures = {}
    for setting, ranks, reference in [
        ("homogeneous", [args.homogeneous_rank] * len(hetero), "fedit"),
        ("heterogeneous", hetero, "zeropad"),
    ]:
        rows = per_client_floats(
            list(registered_methods(built_in=True)), layer, ranks, args.intermediate_rank
        )
        totals = {r["strategy"]: args.layers * (r["up"] + r["down"]) for r in rows}
        print(f"\n{setting}, ranks {','.join(map(str, ranks))}:\n")
        print(f"| strategy | up | down | total | vs {reference} |")
        print("|---|---:|---:|---:|---:|")
        for row in rows:
            name = row["strategy"]
            print(
                f"| {name} | {args.layers * row['up'] / 1e6:.2f} "
                f"| {args.layers * row['down'] / 1e6:.2f} | {totals[name] / 1e6:.2f} "
                f"| {totals[name] / totals[reference]:.3f} |"
            )
        figures[f"{setting}_fedalora_over_{reference}"] = (
            totals["fedalora" if setting == "homogeneous" else "fedalora-hetero"]
            / totals[reference]
        )
    print()
    print(" ".join(f"{key}={value:.3f}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
