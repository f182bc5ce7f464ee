"""Robustness benchmark (issue 23): one hostile client among 12 against each server
policy, on the classification track at a reduced size (packaged MiniLM, cut to
``num-hidden-layers`` layers, on the packaged bbc-news data; 4 Dirichlet groups x 3
clients of ranks 16, 8, 4; fedalora-hetero; ``lora-alpha`` 16, since at the default 2 the
shared state barely moves the clients' predictions at this size).

The hostile client is partition 0 (node 100), a rank-16 client: the highest rank, whose
own update B2 B1 is the largest (its honest norm is about twice a rank-4 client's), so
that an attack on it moves the shared B0 the most; its group (partitions 0-2) shares its
data distribution. Attacks (``benchmarks/attacks.py``): ``none``, ``count-liar``
(claims 10^6 training examples), ``scaled`` (every factor x 9: B2 B1 x 81) and
``sign-flip`` (B2 x -4). Policies: ``examples`` (the default: FedAvg weights, the
method's rule), ``uniform``, ``examples-capped`` (``weight-cap`` 4), ``median``,
``trimmed-mean`` (``trim-fraction`` 0.1: floor(0.1 x 12) = 1 client cut at each end,
entry by entry) and ``clip-norm`` (each update clipped to C, by default the median
update norm of all clients in the no-attack default-policy runs, all rounds, all seeds).
The default screening (``max-norm-ratio`` 10, ``max-update-rms`` 100) is on in every
run: it is part of the default, and it rejects the scaled attack whatever the policy.

Each cell is the honest clients' (partitions 1-11) mean accuracy after the last round
under the ``evaluate`` protocol (each client's model after the last aggregation) and the
``local-model`` protocol (its local model after its last training), with the per-seed
difference against the same policy's no-attack run and against the no-attack default
run (mean over seeds ± the half-width of its 95% Student-t interval).

Pairs that cannot differ from another run are not run (``--all-pairs`` runs them):
``count-liar`` under ``uniform``, ``median`` and ``trimmed-mean`` (these weigh every
client equally, so a claim changes nothing: the cell is the policy's no-attack run),
and ``examples-capped`` under ``none``, ``scaled`` and ``sign-flip`` in a seed whose
honest claims all lie within the cap (the weights are then the claims themselves:
the cell is the ``examples`` run). Every run is the app in this process
(``server.in_process``); the runs are written to ``--output-dir``, one line per run to
``runs.jsonl`` there (``--resume`` keeps the completed ones), the table to stdout and
``--out``. Torch runs on one thread (``--threads``): on a shared 2-core machine its
default of two threads made a round several times slower.

    python benchmarks/robustness.py                          # 3 seeds, the whole grid
    python benchmarks/robustness.py --seeds 0 --rounds 1 --attacks none,sign-flip \\
        --policies examples,clip-norm                        # a smoke run (4 runs)
    python benchmarks/robustness.py --resume                 # go on after an interruption
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from attacks import ATTACKS, LIE, hostile
from common import ROOT, machine, print_figures
from safetensors.numpy import load_file

from fedalora.outputs import (
    CONFIG,
    EVALUATE,
    LOCAL_MODEL,
    METRICS,
    ROUNDS,
    SHARED_STATE,
    SUMMARY,
    TRAIN,
    WARNINGS,
    read_jsonl,
)
from fedalora.robust import EXAMPLES_CAPPED, claim_weights
from fedalora.run_config import format_run_config, parse_run_config
from fedalora.stats import Interval, mean_interval

NUM_CLIENTS = 12
#: The hostile client's partition (node 100 + HOSTILE): rank 16, the highest.
HOSTILE = 0
#: The run-config every run shares (the reduced classification setting).
SETTING: dict[str, object] = {
    "strategy": "fedalora-hetero",
    "model": "minilm",
    "num-hidden-layers": 2,
    "dataset": "bbc-news",
    "partitioning": "dirichlet:0.5",
    "clients-per-group": 3,
    "ranks": "16,8,4",
    "local-steps": 4,
    "batch-size": 8,
    "max-length": 32,
    "lr": 0.01,
    # s = 16 (the default 2 leaves the shared B0 almost no say at this size: the honest
    # clients' losses moved by ~1e-4 whatever the attack)
    "lora-alpha": 16.0,
    # both protocols once, after the last round: each client's local model (scored in its
    # last training) and its model after the last aggregation (the final evaluation)
    "local-model-scoring": "final-round",
    "fraction-evaluate": 0.0,
    "final-evaluation": True,
    "export-adapters": False,
    "checkpoint": False,
}
DEFAULT_POLICY = "examples"
CLIP = "clip-norm"
TRIM_FRACTION = 0.1
#: Policy -> the run-config it sets (clip-norm's bound is added at run time).
POLICIES: dict[str, dict[str, object]] = {
    DEFAULT_POLICY: {},
    "uniform": {"weights": "uniform"},
    EXAMPLES_CAPPED: {"weights": EXAMPLES_CAPPED},
    "median": {"aggregation": "median"},
    "trimmed-mean": {"aggregation": "trimmed-mean", "trim-fraction": TRIM_FRACTION},
    CLIP: {},
}
WEIGHT_CAP = 4.0
#: Policies under which a client's claimed example count does not weigh.
EQUAL_WEIGHTS = ("uniform", "median", "trimmed-mean")
NONE, COUNT_LIAR, SCALED, SIGN_FLIP = ATTACKS
PROTOCOL_COLUMNS = {EVALUATE: "evaluate", LOCAL_MODEL: "local_model"}
RUNS = "runs.jsonl"
_REJECTED = re.compile(r"rejected update of node \d+ \(client (\d+)\)")


@dataclass(frozen=True)
class Cell:
    attack: str
    policy: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.attack}-{self.policy}-s{self.seed}"


def run_config(cell: Cell, rounds: int, clip: float, extra: Mapping[str, object]) -> str:
    """The ``--run-config`` string of a cell's run (``extra``: ``--set``)."""
    values = {
        **SETTING,
        **extra,
        "num-server-rounds": rounds,
        "seed": cell.seed,
        **POLICIES[cell.policy],
        **({"clip-norm": clip} if cell.policy == CLIP else {}),
    }
    return format_run_config(values)


def execute(cell: Cell, config: str, output_dir: Path) -> dict[str, Any]:
    """Run one cell in this process; its figures (``figures_of``) with wall and CPU
    seconds. A run that raises is recorded as failed with the exception."""
    from clients.client_app import app as client_app
    from server.in_process import run_in_process

    node_app = (
        client_app if cell.attack == NONE else hostile(client_app, 100 + HOSTILE, cell.attack)
    )
    wall, cpu = time.perf_counter(), time.process_time()
    error = None
    try:
        run_in_process(
            ROOT,
            cell.name,
            num_supernodes=NUM_CLIENTS,
            run_config=config,
            output_dir=output_dir,
            node_app=node_app,
        )
    except Exception as exc:  # noqa: BLE001 - a failed run is a result of the benchmark
        error = f"{type(exc).__name__}: {exc}"
    record = {
        "name": cell.name,
        "attack": cell.attack,
        "policy": cell.policy,
        "seed": cell.seed,
        "run_config": config,
        **figures_of(output_dir / cell.name),
        "wall_seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
    }
    if error:
        record.update(status="failed", error=record.get("error") or error)
    return record


def figures_of(run_dir: Path) -> dict[str, Any]:
    """A run's status, the honest clients' mean accuracy after the last round under each
    protocol (NaN unless completed), its rejected updates (the hostile client's and the
    others') and failed replies."""
    summary_path = run_dir / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    status = summary.get("status", "missing")
    figures: dict[str, Any] = {"status": status, "error": summary.get("error")}
    rows = read_jsonl(run_dir / METRICS) if (run_dir / METRICS).exists() else []
    for phase, column in PROTOCOL_COLUMNS.items():
        scored = [r for r in rows if r["phase"] == phase and r["client"] != HOSTILE]
        last = max((r["round"] for r in scored), default=0)
        scores = [r["accuracy"] for r in scored if r["round"] == last]
        ok = status == "completed" and scores
        figures[column] = float(np.mean(scores)) if ok else math.nan
        figures[f"{column}_clients"] = len(scores)
    rounds = read_jsonl(run_dir / ROUNDS) if (run_dir / ROUNDS).exists() else []
    figures["rejected"] = sum(int(r.get("rejected", 0)) for r in rounds)
    figures["failed_replies"] = sum(int(r.get("failed", 0)) for r in rounds)
    warnings = (run_dir / WARNINGS).read_text() if (run_dir / WARNINGS).exists() else ""
    clients = [int(c) for c in _REJECTED.findall(warnings)]
    figures["rejected_hostile"] = clients.count(HOSTILE)
    figures["rejected_honest"] = len(clients) - clients.count(HOSTILE)
    return figures


def update_norms(run_dirs: Sequence[Path]) -> list[float]:
    """Every client's ``update_norm`` of every round in ``run_dirs``."""
    return [
        float(row["update_norm"])
        for run_dir in run_dirs
        if (run_dir / METRICS).exists()
        for row in read_jsonl(run_dir / METRICS)
        if row["phase"] == TRAIN and row.get("update_norm") is not None
    ]


def claims_within_cap(run_dir: Path) -> bool:
    """Whether every client's (honest) example count in a no-attack run is its own
    weight under ``examples-capped``: then that policy weighs as ``examples`` does."""
    path = run_dir / CONFIG
    if not path.exists():
        return False
    claims = [int(c["num_examples"]) for c in json.loads(path.read_text())["clients"]]
    return claim_weights(claims, EXAMPLES_CAPPED, WEIGHT_CAP) == claims


def same_as(cell: Cell, planned: set[Cell], capped_identical: Mapping[int, bool]) -> Cell | None:
    """The run a cell cannot differ from (reported in its place), or None."""
    if cell.attack == COUNT_LIAR and cell.policy in EQUAL_WEIGHTS:
        twin = Cell(NONE, cell.policy, cell.seed)
    elif (
        cell.policy == EXAMPLES_CAPPED
        and cell.attack != COUNT_LIAR
        and capped_identical.get(cell.seed, False)
    ):
        twin = Cell(cell.attack, DEFAULT_POLICY, cell.seed)
    else:
        return None
    return twin if twin in planned and same_as(twin, planned, capped_identical) is None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run-config seeds")
    parser.add_argument("--rounds", type=int, default=3, help="num-server-rounds")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="'none' is always run")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--clip-norm",
        type=float,
        default=0.0,
        help="the clip-norm policy's bound; 0: the median update norm of the no-attack "
        "default-policy runs",
    )
    parser.add_argument(
        "--all-pairs",
        action="store_true",
        help="also run the pairs that cannot differ from another run",
    )
    parser.add_argument(
        "--set",
        default="",
        help='run-config that replaces the setting\'s, e.g. "local-steps=8 lr=0.02"',
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--output-dir", default=str(ROOT / "outputs" / "robustness"))
    parser.add_argument("--out", default="", help="also write the table here (markdown)")
    parser.add_argument(
        "--resume", action="store_true", help="keep the completed runs listed in runs.jsonl"
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = parse_run_config(args.set)
    attacks = [NONE, *(a for a in args.attacks.split(",") if a != NONE)]
    policies = args.policies.split(",")
    for name, known in (("attack", ATTACKS), ("policy", tuple(POLICIES))):
        bad = [v for v in (attacks if name == "attack" else policies) if v not in known]
        if bad:
            parser.error(f"unknown {name} {bad[0]!r}; choose from {', '.join(known)}")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / RUNS
    done: dict[str, dict[str, Any]] = {}
    if args.resume and log_path.exists():
        done = {r["name"]: r for r in read_jsonl(log_path) if r["status"] == "completed"}
    elif log_path.exists():
        log_path.unlink()
    started = time.perf_counter()
    records: dict[Cell, dict[str, Any]] = {}

    def run(cell: Cell, clip: float) -> None:
        config = run_config(cell, args.rounds, clip, extra)
        kept = done.get(cell.name)
        if kept and kept["run_config"] == config:
            records[cell] = kept
            return
        record = execute(cell, config, output_dir)
        records[cell] = record
        with log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        print(
            f"[{len(records)}] {cell.name}: {record['status']}, evaluate "
            f"{record['evaluate']:.3f}, local-model {record['local_model']:.3f}, rejected "
            f"{record['rejected']}, {record['wall_seconds']:.0f} s "
            f"({record['cpu_seconds']:.0f} s CPU)",
            file=sys.stderr,
            flush=True,
        )

    # the no-attack default runs first: they give clip-norm's bound and the claims
    for seed in seeds:
        run(Cell(NONE, DEFAULT_POLICY, seed), 0.0)
    norms = update_norms([output_dir / Cell(NONE, DEFAULT_POLICY, s).name for s in seeds])
    clip = args.clip_norm or (float(np.median(norms)) if norms else 1.0)
    capped_identical = {
        s: claims_within_cap(output_dir / Cell(NONE, DEFAULT_POLICY, s).name) for s in seeds
    }
    planned = {Cell(a, p, s) for a in attacks for p in policies for s in seeds}
    planned |= {Cell(NONE, DEFAULT_POLICY, s) for s in seeds}
    reused: dict[Cell, Cell] = {}
    for seed in seeds:
        for policy in policies:
            for attack in attacks:
                cell = Cell(attack, policy, seed)
                twin = None if args.all_pairs else same_as(cell, planned, capped_identical)
                if twin is not None:
                    reused[cell] = twin
                elif cell not in records:
                    run(cell, clip)
    for cell, twin in reused.items():
        records[cell] = {**records[twin], "reused_from": twin.name}

    rows, drops = table_rows(records, attacks, policies, seeds, output_dir)
    ran = [r for r in records.values() if "reused_from" not in r]
    failed = [r for r in ran if r["status"] != "completed"]
    command = "python benchmarks/robustness.py " + " ".join(sys.argv[1:])
    settings = format_run_config({**SETTING, **extra})
    text = (
        f"# Robustness: one hostile client among {NUM_CLIENTS}\n\n"
        f"Setting: fedalora-hetero, {NUM_CLIENTS} clients (4 Dirichlet(0.5) groups x 3 "
        f"clients of ranks 16, 8, 4), {args.rounds} rounds; run-config `{settings}`; the "
        f"hostile client is partition {HOSTILE} (rank 16, the highest rank). Attacks: "
        f"count-liar claims {LIE} examples; scaled multiplies every uploaded factor by 9 "
        "(B2 B1 by 81); sign-flip multiplies B2 by -4. Policies: examples (the default), "
        f"uniform, examples-capped (weight-cap {WEIGHT_CAP:g}), median, trimmed-mean "
        f"(trim-fraction {TRIM_FRACTION:g}: 1 of 12 cut at each end), clip-norm "
        f"(C = {clip:.4g}: "
        + (
            "given"
            if args.clip_norm
            else f"the median of {len(norms)} update norms, every client and round of the "
            "no-attack default runs"
        )
        + "). The default screening (max-norm-ratio 10, max-update-rms 100) is on in every "
        "run, so the scaled attack's update is rejected under every policy.\n\n"
        f"Seeds {', '.join(map(str, seeds))}. Each figure is the honest clients' "
        f"(partitions other than {HOSTILE}) mean accuracy after the last round, as the mean "
        f"over {len(seeds)} seed(s); Δ own / Δ default: the per-seed difference against the "
        "no-attack run of the same policy / of the default policy, mean ± the half-width of "
        "its 95% Student-t interval (no interval from one seed). Shared-state shift: "
        "||S - S0|| / ||S0|| of the final shared B0 S against S0, the same policy's no-attack "
        "run of that seed (how far the hostile client moved the shared state). Rejected: "
        "updates screened out over all seeds and rounds, the hostile client's / the "
        "others'.\n\n"
        f"Command: `{command.strip()}`; {len(ran)} runs ({len(failed)} failed) took "
        f"{sum(r['wall_seconds'] for r in ran) / 60:.1f} min "
        f"({sum(r['cpu_seconds'] for r in ran) / 60:.1f} min CPU); {machine()}; torch "
        f"threads {args.threads or 'default'}.\n\n" + "\n".join(rows) + "\n"
    )
    notes = [f"- {r['name']} failed: {r.get('error') or r['status']}" for r in failed] + [
        f"- {c.name} not run: it cannot differ from {t.name}"
        + (
            " (the policy weighs every client equally)"
            if c.attack == COUNT_LIAR
            else " (every claim is within the cap)"
        )
        for c, t in sorted(reused.items(), key=lambda item: item[0].name)
    ]
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(f"this invocation took {(time.perf_counter() - started) / 60:.1f} min", file=sys.stderr)
    worst = max(drops.items(), key=lambda item: item[1], default=(("-", "-"), math.nan))
    default = [d for (a, p), d in drops.items() if p == DEFAULT_POLICY]
    print_figures(
        worst_honest_drop=float(worst[1]),
        worst_cell=f"{worst[0][0]}/{worst[0][1]}",
        default_policy_worst_drop=float(max(default, default=math.nan)),
        clip_norm=clip,
        runs=len(ran),
        failed_runs=len(failed),
    )


def table_rows(
    records: Mapping[Cell, Mapping[str, Any]],
    attacks: Sequence[str],
    policies: Sequence[str],
    seeds: Sequence[int],
    output_dir: Path,
) -> tuple[list[str], dict[tuple[str, str], float]]:
    """The markdown table, and each attacked cell's mean drop under the evaluate protocol
    (no-attack minus attacked, same policy; positive: worse)."""
    lines = [
        "| attack | policy | evaluate | Δ own | Δ default | local-model | Δ own | Δ default "
        "| shared-state shift | rejected | failed runs | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    drops: dict[tuple[str, str], float] = {}
    for attack in attacks:
        for policy in policies:
            cells = [records.get(Cell(attack, policy, s)) for s in seeds]
            if any(c is None for c in cells):
                continue
            figures = []
            for column in PROTOCOL_COLUMNS.values():
                values = [c[column] for c in cells if c]
                own = [records[Cell(NONE, policy, s)][column] for s in seeds]
                default = [records[Cell(NONE, DEFAULT_POLICY, s)][column] for s in seeds]
                own_diff = _paired(values, own)
                figures += [
                    _fmt(mean_interval(values)),
                    "—" if attack == NONE else _fmt(own_diff, signed=True),
                    "—"
                    if attack == NONE and policy == DEFAULT_POLICY
                    else _fmt(_paired(values, default), signed=True),
                ]
                if column == PROTOCOL_COLUMNS[EVALUATE] and attack != NONE:
                    drops[(attack, policy)] = 0.0 - own_diff.mean
            shift = (
                "—"
                if attack == NONE
                else _fmt(
                    mean_interval(
                        [
                            _shift(
                                output_dir,
                                records[Cell(attack, policy, s)],
                                records[Cell(NONE, policy, s)],
                            )
                            for s in seeds
                        ]
                    )
                )
            )
            figures.append(shift)
            hostile = sum(c["rejected_hostile"] for c in cells if c)
            honest = sum(c["rejected_honest"] for c in cells if c)
            failed = sum(c["status"] != "completed" for c in cells if c)
            reused = sum("reused_from" in c for c in cells if c)
            policy_label = policy + (" (default)" if policy == DEFAULT_POLICY else "")
            lines.append(
                f"| {attack} | {policy_label} | "
                + " | ".join(figures)
                + f" | {hostile}/{honest} | {failed} | "
                + (f"{reused} of {len(seeds)} seeds not run (identical run)" if reused else "")
                + " |"
            )
    return lines, drops


def _shift(output_dir: Path, run: Mapping[str, Any], reference: Mapping[str, Any]) -> float:
    """||S - S_ref|| / ||S_ref|| over the final shared state S of a run and that of its
    reference (the same policy and seed without the attack); NaN if either is missing."""
    paths = [output_dir / r.get("reused_from", r["name"]) / SHARED_STATE for r in (run, reference)]
    if not all(p.exists() for p in paths):
        return math.nan
    state, ref = (load_file(str(p)) for p in paths)
    gap = sum(float(np.sum((state[k].astype(np.float64) - ref[k]) ** 2)) for k in ref)
    size = sum(float(np.sum(ref[k].astype(np.float64) ** 2)) for k in ref)
    return math.sqrt(gap / size) if size else math.nan


def _paired(values: Sequence[float], baseline: Sequence[float]) -> Interval:
    return mean_interval([a - b for a, b in zip(values, baseline, strict=True)])


def _fmt(interval: Interval, signed: bool = False) -> str:
    """``mean ± half-width`` (the mean alone from one seed; n/a without a value)."""
    if math.isnan(interval.mean):
        return "n/a"
    mean = f"{interval.mean:+.3f}" if signed else f"{interval.mean:.3f}"
    return mean if math.isnan(interval.low) else f"{mean} ± {interval.half_width:.3f}"


if __name__ == "__main__":
    main()
