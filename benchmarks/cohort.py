"""Cohorts: many clients per node, trained and scored in one batched pass over one base.

Three measurements, each ending with a ``key=value`` line:

``speed``: clients trained per second (or, with ``--score``, scored per second: both
protocols' evaluation and, on instruction data, greedy generation), cohorts (one
batched pass over one base per step) against one client at a time, in one worker
process. ``--clients`` clients of one configuration share the worker's base model;
each trains one round (``local-steps`` steps of ``batch-size`` examples) from the
method's initial shared state. One at a time is ``FederatedClient.train`` (or
``evaluate_adapter``) per client; a cohort of K is ``fedalora.client.train_cohort``
(or ``score_cohort``) with ``cohort_size=K``. After a warm-up (allocator, kernels: one
client alone, one cohort of 8), each mode runs ``--repeats`` times; the median is kept.
One at a time may time a subset (``--alone-clients``): its rate is per client. Training
does not score the local model (``local-model-scoring=final-round``). Peak GPU memory is
reported on CUDA. ``--random-weights`` builds the model from the config and tokenizer in
the ``model`` folder with random weights (for a machine that cannot carry the weights).

``memory``: the peak memory of the Ray actors of a one-round Flower simulation of 8
clients: the memory that the actors map and no other process does, each page counted
once (``common.group_unique_bytes``; the libraries every torch process shares do not
count, and a model file that 8 actors map counts once; root only, ``--measure uss`` for
the actors' summed USS, which counts such a file in none of them; their PSS and the
whole simulation's PSS are printed too): 8 one-client nodes, each in its own actor (8
actors on this machine's CPUs, as ``--num-cpus 0.25`` packs them: Flower takes whole
CPUs per actor, so Ray declares 16 CPUs and each actor takes 2), against one node
hosting all 8 in one actor, at each ``--cohort-sizes`` (a cohort's activations are those
of all of its clients' batches at once, so ``cohort-size`` trades memory for batching);
for MiniLM classification and SmolLM2 instruction clients. ``--run-config`` applies to
every layout (for example ``activation-checkpointing=true``); ``--allocator jemalloc``
runs every layout's processes and Ray workers on jemalloc
(``fedalora.launch.processes.allocator_env``) instead of the system's allocator,
``--cohort-allocator`` only the layouts hosting 8 (the README's advice: jemalloc for
nodes hosting cohorts, the system's for one client per node).

``scale``: five rounds of a Flower simulation on 2 nodes (one actor each) hosting 20
and then 1,000 clients, with ``state-store=disk`` and cohorts of at most 8: a round's
time (the median of the middle rounds: neither the first, which loads, nor the last,
which scores the local models) and the run's peak memory, with 20 clients sampled per
round in both, and 40 of the 1,000.

    python benchmarks/cohort.py speed --clients 16 --cohort-sizes 8,16
    python benchmarks/cohort.py speed --score --clients 16 --cohort-sizes 8 \\
        --run-config "model='smollm2' dataset='instructions' partitioning='iid'"
    python benchmarks/cohort.py speed --random-weights --bf16 --clients 128 \\
        --cohort-sizes 8,32,128 \\
        --run-config "model='.gpu/smollm2' dataset='.gpu/instructions.jsonl' partitioning='iid'"
    python benchmarks/cohort.py memory
    python benchmarks/cohort.py memory --models smollm2 --run-config "activation-checkpointing=true"
    python benchmarks/cohort.py memory --models smollm2 --allocator jemalloc
    python benchmarks/cohort.py memory --models smollm2 --cohort-allocator jemalloc
    python benchmarks/cohort.py scale
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import ROOT, PeakMemory, federation, machine, print_figures
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fedalora.client import FederatedClient, score_cohort, train_cohort
from fedalora.config import FedConfig
from fedalora.launch.processes import ALLOCATORS
from fedalora.launch.simulate import run_simulation
from fedalora.outputs import read_jsonl
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


def speed(args: argparse.Namespace) -> None:
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
        adapters = [c.build_adapter(shared, None) for c in clients] if args.score else []

        def one_at_a_time() -> None:
            for k, client in enumerate(alone):
                if args.score:
                    client.evaluate_adapter(adapters[k])
                else:
                    client.train(shared, None, 1)

        def in_cohorts(size: int, count: int = len(clients)) -> Callable[[], None]:
            def work() -> None:
                if args.score:
                    score_cohort(clients[:count], adapters[:count], cohort_size=size)
                else:
                    train_cohort(
                        clients[:count], shareds[:count], privates[:count], 1, cohort_size=size
                    )

            return work

        timed(device, in_cohorts(8, min(8, len(clients))))  # warm-up
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
    what = "scored" if args.score else "trained"
    print_figures(
        clients=len(clients),
        **{f"one_at_a_time_clients_{what}_per_s": base},
        **{
            f"speedup_cohort_{name.rsplit(' ', 1)[1]}": rate / base
            for name, rate in rates.items()
            if name != "one at a time"
        },
    )


#: One round of 8 clients, scoring only the trained local models (both models' runs).
MEMORY_RUN = (
    "strategy='fedalora-hetero' ranks='64,32,16,8' local-steps=2 batch-size=8 max-length=64 "
    "num-server-rounds=1 local-model-scoring='final-round' fraction-evaluate=0 "
    "final-evaluation=false lora-dropout=0.0 test-fraction=0.05"
)
MEMORY_MODELS = {
    "minilm": "model='minilm' dataset='bbc-news'",
    "smollm2": "model='smollm2' dataset='instructions' partitioning='iid' max-new-tokens=8",
}


def memory(args: argparse.Namespace) -> None:
    figures: dict[str, float] = {}
    sizes = [int(size) for size in args.cohort_sizes.split(",")]
    cohorts_on = args.cohort_allocator or args.allocator
    group = args.measure == "group"
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            run_config = f"{MEMORY_RUN} {MEMORY_MODELS[model]} {args.run_config}"
            layouts = [("8 one-client actors", "alone", 8, 16, "")] + [
                (
                    f"one actor hosting 8, cohorts of {size}",
                    f"cohort_{size}",
                    1,
                    None,
                    f"num-clients=8 min-nodes=1 cohort-size={size}",
                )
                for size in sizes
            ]
            peaks = {}
            for layout, key, nodes, ray_cpus, extra in layouts:
                name = f"{model}-{key}"
                with (
                    PeakMemory(1.0, only="ClientAppActor", group=group) as actors,
                    PeakMemory(1.0) as everything,
                ):
                    started = time.perf_counter()
                    run_simulation(
                        ROOT,
                        name,
                        num_supernodes=nodes,
                        num_cpus=2,
                        ray_num_cpus=ray_cpus,
                        run_config=f"{run_config} {extra}",
                        output_dir=tmp,
                        log_path=Path(tmp) / f"{name}.log",
                        allocator=args.allocator if key == "alone" else cohorts_on,
                    )
                    seconds = time.perf_counter() - started
                peaks[key] = actors.peak_group_bytes if group else actors.peak_unique_bytes
                print(
                    f"{model}, {layout}: actors' peak "
                    + (f"memory {actors.peak_group_bytes / 2**30:.2f} GiB, " if group else "")
                    + f"USS {actors.peak_unique_bytes / 2**30:.2f} GiB, PSS "
                    f"{actors.peak_bytes / 2**30:.2f} GiB ({actors.peak_processes} "
                    f"actor processes), whole simulation's PSS "
                    f"{everything.peak_bytes / 2**30:.2f} GiB, {seconds:.0f} s, actors on "
                    f"{'/'.join(sorted(actors.allocators))}",
                    flush=True,
                )
            figures[f"{model}_actors_{args.measure}_gib_alone"] = peaks["alone"] / 2**30
            for size in sizes:
                figures[f"{model}_memory_ratio_cohort_{size}"] = (
                    peaks[f"cohort_{size}"] / peaks["alone"]
                )
    print_figures(**figures)


#: A few short rounds of MiniLM clients on 20 Newsgroups (11,293 posts: 11 per client at
#: 1,000 clients), private state on disk, only the trained local models scored.
SCALE_RUN = (
    "strategy='fedalora-hetero' ranks='64,32,16,8' model='minilm' dataset='20newsgroups' "
    "partitioning='iid' local-steps=2 batch-size=8 max-length=64 num-server-rounds=5 "
    "local-model-scoring='final-round' fraction-evaluate=0 final-evaluation=false "
    "state-store='disk' test-fraction=0.2 export-adapters=false cohort-size=8"
)


def scale(args: argparse.Namespace) -> None:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for hosted, sampled in ((20, 20), (args.clients, 20), (args.clients, 40)):
            name = f"scale-{hosted}-{sampled}"
            run_config = (
                f"{SCALE_RUN} num-clients={hosted} fraction-train={sampled / hosted:.6g} "
                f"state-dir='{Path(tmp) / name / 'state'}'"
            )
            with PeakMemory(1.0) as everything:
                started = time.perf_counter()
                run_dir = run_simulation(
                    ROOT,
                    name,
                    num_supernodes=2,
                    num_cpus=1,
                    run_config=run_config,
                    output_dir=tmp,
                    log_path=Path(tmp) / f"{name}.log",
                    timeout=3600,
                )
                seconds = time.perf_counter() - started
            rounds = read_jsonl(run_dir / "rounds.jsonl")
            round_seconds = statistics.median(r["seconds"] for r in rounds[1:-1])
            before = seconds - sum(r["seconds"] for r in rounds)
            each = ", ".join(f"{r['seconds']:.1f}" for r in rounds)
            print(
                f"{hosted} clients, {sampled} sampled per round: a round "
                f"{round_seconds:.1f} s (median of rounds 2-{len(rounds) - 1}; rounds "
                f"{each} s), start and "
                f"discovery {before:.0f} s, peak memory "
                f"{everything.peak_bytes / 2**30:.2f} GiB",
                flush=True,
            )
            key = f"{hosted}_hosted_{sampled}_sampled"
            figures[f"round_s_{key}"] = round_seconds
            figures[f"peak_gib_{key}"] = everything.peak_bytes / 2**30
    many = args.clients
    figures["round_ratio_hosted"] = (
        figures[f"round_s_{many}_hosted_20_sampled"] / figures["round_s_20_hosted_20_sampled"]
    )
    figures["round_ratio_sampled"] = (
        figures[f"round_s_{many}_hosted_40_sampled"] / figures[f"round_s_{many}_hosted_20_sampled"]
    )
    figures["memory_ratio_hosted"] = (
        figures[f"peak_gib_{many}_hosted_20_sampled"] / figures["peak_gib_20_hosted_20_sampled"]
    )
    print_figures(**figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True)
    timing = commands.add_parser("speed", help="clients trained or scored per second")
    timing.set_defaults(handler=speed)
    timing.add_argument("--clients", type=int, default=8)
    timing.add_argument("--cohort-sizes", default="8")
    timing.add_argument(
        "--alone-clients",
        type=int,
        default=0,
        help="how many of the clients train one at a time for that rate (0: all)",
    )
    timing.add_argument("--repeats", type=int, default=1)
    timing.add_argument("--score", action="store_true", help="time scoring, not training")
    timing.add_argument("--bf16", action="store_true")
    timing.add_argument("--random-weights", action="store_true")
    timing.add_argument("--run-config", default="", help="overrides of the defaults")
    peaks = commands.add_parser("memory", help="8 one-client actors against one cohort actor")
    peaks.set_defaults(handler=memory)
    peaks.add_argument("--models", default="minilm,smollm2")
    peaks.add_argument(
        "--cohort-sizes", default="8,2", help="cohort-size of the node hosting the 8 clients"
    )
    peaks.add_argument(
        "--run-config", default="", help="overrides for every layout, the 8 actors' too"
    )
    peaks.add_argument(
        "--measure",
        choices=("group", "uss"),
        default="group",
        help="the actors' memory: pages only they map, each once (root only), or summed USS",
    )
    peaks.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="system",
        help="the memory allocator of every layout's processes and Ray workers",
    )
    peaks.add_argument(
        "--cohort-allocator",
        choices=ALLOCATORS,
        default=None,
        help="the allocator of the layouts hosting 8 (default: --allocator)",
    )
    hosting = commands.add_parser("scale", help="20 and 1,000 clients on 2 nodes")
    hosting.set_defaults(handler=scale)
    hosting.add_argument("--clients", type=int, default=1000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    args.handler(args)


if __name__ == "__main__":
    main()
