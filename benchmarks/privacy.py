"""Privacy-utility benchmark: the heterogeneous classification setting of
``benchmarks/grid.py`` (12 clients: 4 Dirichlet groups x ranks 64, 16, 8) without DP
and at several client-level epsilons, for fedalora-hetero, ffa-lora and zeropad, with
the ``local`` reference (no sharing, so nothing to protect).

For each target epsilon the noise multiplier z is calibrated with dp-accounting so that
the run's epsilon after its rounds is the target at delta = 1 / N^1.1 (central DP,
every client every round). Each method's clip bound C is the median of its clients'
round-1 update norms (``update_norm`` in metrics.jsonl) in its own runs without DP: a
tuning choice taken from data outside the guarantee, as is usual and stated here.
Writes runs.csv (every run's figures), table.csv, table.md and privacy.png into the
output directory; the notebook ``notebooks/client_fairness.ipynb`` draws the same plot
from the run directories.

    python benchmarks/privacy.py                         # 3 seeds, epsilon 1, 3, 8
    python benchmarks/privacy.py --seeds 2 --epsilons 3,8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import ROOT, machine, print_figures
from grid import LOCAL, PRESETS, Grid, Preset, Run, figures_of

from fedalora.comparison import (
    PRIVACY_FIGURES,
    paired_gain,
    plot_privacy_utility,
    privacy_utility,
    reading,
)
from fedalora.outputs import LOCAL_MODEL, METRICS, PROTOCOLS, TRAIN, read_jsonl
from fedalora.privacy import noise_for_epsilon

SETTING = "heterogeneous"
METHODS = ("fedalora-hetero", "ffa-lora", "zeropad")


def clip_bound(run_dirs: list[Path]) -> float:
    """The median of the clients' round-1 update norms over ``run_dirs``."""
    norms = [
        row["update_norm"]
        for run_dir in run_dirs
        for row in read_jsonl(run_dir / METRICS)
        if row["phase"] == TRAIN and row["round"] == 1
    ]
    return float(np.median(norms))


def label(method: str, epsilon: float | None) -> str:
    return method if epsilon is None else f"{method}-eps{epsilon:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,3,8", help="comma-separated targets")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=42)
    parser.add_argument("--protocol", choices=PROTOCOLS, default=LOCAL_MODEL)
    parser.add_argument("--output-dir", default=str(ROOT / "outputs" / "privacy"))
    parser.add_argument(
        "--resume", action="store_true", help="keep runs already completed in the output directory"
    )
    args = parser.parse_args()
    epsilons = [float(e) for e in args.epsilons.split(",")]
    methods = args.methods.split(",")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    base = PRESETS[("classification", "default")]
    num_clients, rounds = base.num_clients, int(str(base.run_config["num-server-rounds"]))
    delta = 1 / num_clients**1.1
    noise = {
        e: noise_for_epsilon(
            e, rounds, delta=delta, num_clients=num_clients, sample_size=num_clients
        )
        for e in epsilons
    }
    output_dir = Path(args.output_dir).resolve()
    preset = Preset(
        num_clients,
        base.metric,
        base.run_config,
        {SETTING: base.settings[SETTING]},
        {SETTING: methods},
        note=base.note,
    )
    grid = Grid.at(preset, {}, output_dir, "in-process", args.resume)
    started = time.perf_counter()
    plain = [Run(SETTING, m, s) for m in [*methods, LOCAL] for s in seeds]
    grid.execute_all(plain, None, args.resume)
    clips = {m: clip_bound([output_dir / Run(SETTING, m, s).name for s in seeds]) for m in methods}
    rows = {
        label(m, e): (m, {"dp-noise-multiplier": noise[e], "dp-clip": clips[m]})
        for m in methods
        for e in epsilons
    }
    grid.preset = Preset(
        num_clients, base.metric, base.run_config, preset.settings, preset.strategies, rows=rows
    )
    private = [Run(SETTING, name, s) for name in rows for s in seeds]
    grid.execute_all(private, None, args.resume)

    federated = [r for r in plain if r.strategy != LOCAL] + private
    run_dirs = [output_dir / r.name for r in federated]
    per_run = figures_of(grid, federated, base.metric, args.protocol)
    per_run.to_csv(output_dir / "runs.csv", index=False)
    table = privacy_utility(run_dirs, base.metric, args.protocol)
    table.to_csv(output_dir / "table.csv", index=False)
    plot_privacy_utility(table, base.metric).savefig(output_dir / "privacy.png", dpi=120)
    readings = _readings(per_run, methods, epsilons)
    command = "python benchmarks/privacy.py " + " ".join(sys.argv[1:])
    text = (
        f"Privacy-utility, {num_clients} clients ({base.note}); run-config "
        f"{json.dumps(base.run_config)}, ranks {base.settings[SETTING]}; central client-level "
        f"DP, every client every round, delta {delta:.3g}; noise multipliers "
        f"{ {f'{e:g}': round(z, 4) for e, z in noise.items()} }; clip bounds (median round-1 "
        f"update norm without DP) { {m: round(c, 4) for m, c in clips.items()} }; metric "
        f"`{base.metric}` under the `{args.protocol}` protocol.\nSeeds {seeds[0]}..{seeds[-1]}:"
        f" each cell is the mean over {len(seeds)} seeds ± the half-width of its 95% "
        f"Student-t interval; differences are paired by seed.\nCommand: `{command.strip()}`; "
        f"machine: {platform.node()} ({os.cpu_count()} CPUs); {machine()}; the runs took "
        f"{sum(grid.walls.values()) / 60:.1f} min in all.\n\n"
        + _markdown(table)
        + "\n"
        + "\n".join(f"- {r}" for r in readings)
        + "\n"
    )
    (output_dir / "table.md").write_text(text)
    print(text)
    print(f"this invocation took {(time.perf_counter() - started) / 60:.1f} min")
    lowest = min(epsilons)
    print_figures(
        **{
            f"{m.replace('-', '_')}_eps{lowest:g}_lowest_rank_mean": float(
                per_run.loc[per_run["strategy"] == label(m, lowest), "lowest_rank_mean"].mean()
            )
            for m in methods
        }
    )


def _markdown(table: pd.DataFrame) -> str:
    lines = [
        "| method | epsilon | z | seeds | " + " | ".join(PRIVACY_FIGURES) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(PRIVACY_FIGURES),
    ]
    for _, row in table.iterrows():
        cells = []
        for figure in PRIVACY_FIGURES:
            half = (row[f"{figure}_high"] - row[f"{figure}_low"]) / 2
            cells.append(f"{row[figure]:.3f}" + ("" if np.isnan(half) else f" ± {half:.3f}"))
        epsilon = "no DP" if np.isinf(row["epsilon"]) else f"{row['epsilon']:.3g}"
        lines.append(
            f"| {row['strategy']} | {epsilon} | {row['noise_multiplier']:.3g} | {row['seeds']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _readings(per_run: pd.DataFrame, methods: list[str], epsilons: list[float]) -> list[str]:
    """At each epsilon: each method's lowest-rank tier against fedalora-hetero's, and
    each method's mean against its own run without DP, paired by seed."""

    def seeds_of(name: str) -> list[dict]:
        rows = per_run[per_run["strategy"] == name].sort_values("seed")
        return [{str(k): v for k, v in r.items()} for r in rows.to_dict("records")]

    readings = []
    for e in epsilons:
        for m in methods:
            readings.append(
                reading(
                    paired_gain(seeds_of(label(m, e)), seeds_of(m)),
                    f"epsilon {e:g}: {m}'s mean with DP minus without",
                )
            )
            if m != METHODS[0] and METHODS[0] in methods:
                readings.append(
                    reading(
                        paired_gain(
                            seeds_of(label(m, e)),
                            seeds_of(label(METHODS[0], e)),
                            "lowest_rank_mean",
                        ),
                        f"epsilon {e:g}: lowest-rank tier of {m} minus {METHODS[0]}'s",
                    )
                )
    return readings


if __name__ == "__main__":
    main()
