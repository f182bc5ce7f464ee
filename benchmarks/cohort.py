"""Clients trained per second: cohorts (one batched pass over one base per step) against
one client at a time, in one worker process.

``--clients`` clients of one configuration share the worker's base model; each trains
one round (``local-steps`` steps of ``batch-size`` examples) from the method's initial
shared state. One at a time is ``FederatedClient.train`` per client (the adapter swapped
on the shared base); a cohort of K is ``fedalora.client.train_cohort`` with
``cohort_size=K``. After a warm-up (allocator, kernels: one client alone, one cohort of 8),
each mode runs
``--repeats`` times; the median is kept. One at a time may time a subset
(``--alone-clients``): its rate is per client. The local model is not scored
(``local-model-scoring=final-round``), so the figures are training alone. Peak GPU
memory is reported on CUDA.

``--random-weights`` builds the model from the config and tokenizer in the ``model``
folder with random weights (for a machine that cannot carry the weights): the shapes,
and so the work per step, are the model's.

    python benchmarks/cohort.py --clients 16 --cohort-sizes 8,16
    python benchmarks/cohort.py --random-weights --bf16 --clients 128 --cohort-sizes 8,32,128 \\
        --run-config "model='.gpu/smollm2' dataset='.gpu/instructions.jsonl' partitioning='iid'"
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import federation, machine, print_figures
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fedalora.client import FederatedClient, train_cohort
from fedalora.config import FedConfig
from fedalora.run_config import parse_run_config

DEFAULTS = (
    "strategy='fedalora-hetero' ranks='64,32,16,8' local-steps=10 batch-size=8 "
    "max-length=64 local-model-scoring='final-round' lora-dropout=0.0"
)


def with_random_weights(folder: str, into: Path) -> str:
    """A causal LM with ``folder``'s config and tokenizer and random weights, saved in
    ``into``."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.save_pretrained(into)
    AutoTokenizer.from_pretrained(folder).save_pretrained(into)
    return str(into)


def timed(device: torch.device, work) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cohort-sizes", default="8")
    parser.add_argument(
        "--alone-clients",
        type=int,
        default=0,
        help="how many of the clients train one at a time for that rate (0: all)",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--run-config", default="", help="overrides of the defaults")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    values = {**parse_run_config(DEFAULTS), **parse_run_config(args.run_config)}
    values["bf16"] = args.bf16
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_weights:
            values["model"] = with_random_weights(str(values["model"]), Path(tmp) / "model")
        config = FedConfig.from_run_config(values)
        print(f"run-config: {values}")
        clients = [
            FederatedClient(config, p, args.clients, config.run.rank_for(p))
            for p in range(args.clients)
        ]
        device = clients[0].device
        _, shared = federation(clients)
        shareds, privates = [shared] * len(clients), [None] * len(clients)

        alone = clients[: args.alone_clients or len(clients)]

        def one_at_a_time() -> None:
            for client in alone:
                client.train(shared, None, 1)

        def in_cohorts(size: int, count: int = len(clients)) -> Callable[[], None]:
            def work() -> None:
                train_cohort(
                    clients[:count], shareds[:count], privates[:count], 1, cohort_size=size
                )

            return work

        timed(device, in_cohorts(8, 8))  # warm-up
        timed(device, lambda: alone[0].train(shared, None, 1))
        modes = {"one at a time": (len(alone), one_at_a_time)}
        for size in (int(s) for s in args.cohort_sizes.split(",")):
            modes[f"cohorts of {size}"] = (len(clients), in_cohorts(size))
        rates = {}
        for name, (count, work) in modes.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = statistics.median(timed(device, work) for _ in range(args.repeats))
            rates[name] = count / seconds
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0
            print(
                f"{name}: {seconds:.2f} s for {count} clients, {rates[name]:.2f} clients/s"
                + (f", peak GPU memory {peak:.2f} GiB" if device.type == "cuda" else ""),
                flush=True,
            )
    base = rates["one at a time"]
    print_figures(
        clients=len(clients),
        one_at_a_time_clients_per_s=base,
        **{
            f"speedup_cohort_{name.rsplit(' ', 1)[1]}": rate / base
            for name, rate in rates.items()
            if name != "one at a time"
        },
    )


if __name__ == "__main__":
    main()
