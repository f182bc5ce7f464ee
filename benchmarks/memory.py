"""Peak memory of a 1,000-client simulation against a 100-client one.

Both are ``flwr run`` simulations (``fedalora.launch.simulate``, a fresh Ray instance each)
with 10% participation (``fraction-train`` = ``fraction-evaluate`` = 0.1; the last
round evaluates every client) and private state on disk (``state-store=disk``),
the default strategy and ranks, on a model and data set sized for 1,000 clients on
2 cores: MiniLM cut to 2 layers, 20 Newsgroups split IID, 1 step of batch 8
(32 tokens) per round, 3 rounds. Memory is the peak over the run of the summed
proportional set size (PSS) of this process and all its descendants: SuperLink,
simulation process, Ray's processes and workers.

    python benchmarks/memory.py [--clients 100,1000] [--state-store disk]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import ROOT, PeakMemory, machine, print_figures

from fedalora.launch.simulate import run_simulation

RUN_CONFIG = (
    "num-hidden-layers=2 dataset='20newsgroups' partitioning='iid' local-steps=1 "
    "batch-size=8 max-length=32 num-server-rounds=3 fraction-train=0.1 "
    "fraction-evaluate=0.1 min-nodes=2 export-adapters=false"
)


def peak_memory(num_clients: int, state_store: str) -> tuple[float, float]:
    """(peak GiB, wall seconds) of one simulation with ``num_clients`` clients."""
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as memory:
        started = time.perf_counter()
        run_simulation(
            ROOT,
            f"memory-{num_clients}",
            num_supernodes=num_clients,
            run_config=f"{RUN_CONFIG} state-store='{state_store}'",
            output_dir=Path(tmp),
            flwr_home=Path(tmp) / ".flwr-home",
            log_path=Path(tmp) / "run.log",
            timeout=3000,
        )
        seconds = time.perf_counter() - started
    return memory.peak_bytes / 2**30, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients", default="100,1000", help="the baseline size, then the large size"
    )
    parser.add_argument("--state-store", default="disk", choices=("disk", "memory"))
    args = parser.parse_args()
    small, large = (int(x) for x in args.clients.split(","))
    print(f"machine: {machine()}")
    print(f"run-config: {RUN_CONFIG} state-store='{args.state_store}'")
    figures = {}
    for num_clients in (small, large):
        gib, seconds = peak_memory(num_clients, args.state_store)
        print(f"{num_clients} clients: peak {gib:.2f} GiB PSS, {seconds:.0f} s", flush=True)
        figures[num_clients] = gib
    print_figures(
        **{
            f"peak_gib_{small}": figures[small],
            f"peak_gib_{large}": figures[large],
            "memory_ratio": figures[large] / figures[small],
        }
    )


if __name__ == "__main__":
    main()
