"""Server aggregation time per round against the number of replies.

Each method's own ``aggregate`` (the pure rule it calls, with its server-side
arguments) runs on 10, 100 and 1,000 fabricated replies of a SmolLM2-sized model:
30 layers x {q_proj, v_proj}, every adapted layer 576 x 576, client ranks cycled
64, 32, 16, 8, d_m = 16. Replies reuse a pool of distinct random arrays (the work
does not depend on the values; memory stays that of the pool). Prints seconds per
round, the growth exponent k of seconds ~ replies^k (least squares over the sizes)
and the ratio to FlexLoRA at each size.

    python benchmarks/aggregation.py [--replies 10,100,1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import machine, print_figures

from fedalora.config import FedConfig
from fedalora.methods import Method, Participant

STRATEGY_NAMES = ("fedalora-hetero", "zeropad", "flexlora", "flora")
LAYERS, D_MODEL, RANKS, D_M = 30, 576, (64, 32, 16, 8), 16
POOL_PER_RANK = 4


def layer_shapes() -> dict[str, tuple[int, int]]:
    return {
        f"model.layers.{i}.self_attn.{p}": (D_MODEL, D_MODEL)
        for i in range(LAYERS)
        for p in ("q_proj", "v_proj")
    }


def make_method(name: str, num_replies: int) -> tuple[Method, list[Participant], dict]:
    """The method, ``num_replies`` clients (ranks cycled) and its initial shared state."""
    config = FedConfig.from_run_config(
        {"ranks": ",".join(map(str, RANKS)), "intermediate-rank": D_M}
    ).with_strategy(name)
    clients = [Participant(i, RANKS[i % len(RANKS)], 100 + i % 7) for i in range(num_replies)]
    method = config.method
    return method, clients, method.initial_shared(layer_shapes(), [c.rank for c in clients])


def reply_pool(method: Method, rng: np.random.Generator) -> dict[int, list[dict[str, np.ndarray]]]:
    """Per rank, a few distinct random uploads of the shapes the method expects (in
    round 1)."""
    return {
        rank: [
            {
                k: (rng.standard_normal(shape) * 0.01).astype(np.float32)
                for k, shape in method.upload_shapes(layer_shapes(), rank, 1).items()
            }
            for _ in range(POOL_PER_RANK)
        ]
        for rank in RANKS
    }


def seconds_per_round(name: str, num_replies: int, repeats: int) -> float:
    """Best of ``repeats`` timings of one aggregation over ``num_replies`` replies."""
    method, clients, shared = make_method(name, num_replies)
    pool = reply_pool(method, np.random.default_rng(0))
    updates = [pool[c.rank][i % POOL_PER_RANK] for i, c in enumerate(clients)]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = method.aggregate(shared, updates, clients)
        best = min(best, time.perf_counter() - started)
        del result
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", default="10,100,1000")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timings per size (best kept); 1 for the largest size",
    )
    args = parser.parse_args()
    sizes = [int(x) for x in args.replies.split(",")]
    print(f"machine: {machine()}")
    print(
        f"model: {LAYERS} layers x q,v = {2 * LAYERS} adapted {D_MODEL}x{D_MODEL} layers, "
        f"ranks cycled {RANKS}, d_m={D_M}"
    )
    seconds: dict[str, list[float]] = {}
    for name in STRATEGY_NAMES:
        seconds[name] = [
            seconds_per_round(name, n, args.repeats if n < max(sizes) else 1) for n in sizes
        ]
    print(
        "| strategy | "
        + " | ".join(f"{n} replies (s)" for n in sizes)
        + " | growth exponent | "
        + " | ".join(f"/ flexlora @{n}" for n in sizes)
        + " |"
    )
    print("|---" * (2 + 2 * len(sizes)) + "|")
    figures: dict[str, float] = {}
    for name in STRATEGY_NAMES:
        exponent = float(np.polyfit(np.log(sizes), np.log(seconds[name]), 1)[0])
        ratios = [s / f for s, f in zip(seconds[name], seconds["flexlora"], strict=True)]
        print(
            f"| {name} | "
            + " | ".join(f"{s:.3f}" for s in seconds[name])
            + f" | {exponent:.2f} | "
            + " | ".join(f"{r:.3f}" for r in ratios)
            + " |"
        )
        key = name.replace("-", "_")
        figures[f"{key}_seconds_{max(sizes)}"] = seconds[name][-1]
        figures[f"{key}_exponent"] = exponent
        figures[f"{key}_ratio_to_flexlora"] = ratios[-1]
    print_figures(**figures)


if __name__ == "__main__":
    main()
