"""The benchmark grid: methods x rank settings x seeds on one track, plus the ``local``
reference (Delta_m% is computed against it, seed by seed) and the ``centralised`` ALoRA
multi-task reference. Every figure is reported as its mean over the seeds with a 95%
Student-t interval, and each method's mean client metric as a paired difference (seed
by seed) against Fed-ALoRA's, with what the interval allows one to read from it.

Clients are scored under the paper's protocol by default (each client's local model
right after its last local training; ``--protocol evaluate``: its model after the last
aggregation). The presets separate rank from data: clients come in groups that share
one data distribution (a task, or one Dirichlet part; ``clients-per-group``), and every
group has a client of every rank.

Every federated run is the Flower app in this script's process (``--mode in-process``,
the default: the same ServerApp, strategy and ClientApp with messages delivered here,
the base model and data loaded once for all runs; the same results as a Ray simulation)
or a Ray simulation on one cluster that the script starts and stops (``--mode ray``);
the centralised reference runs here too. Each run's Flower log is in ``logs/``. Writes
``runs.csv`` (every run's figures), ``table.csv`` (mean, low and high per figure) and
``table.md`` into the output directory, next to the run directories.

    python benchmarks/grid.py                                    # classification, 3 seeds
    python benchmarks/grid.py --track instruction                # SmolLM2, 8 tasks x 3 ranks
    python benchmarks/grid.py --track instruction --preset paper   # meant for a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from fedalora.centralised import run_centralised
from fedalora.comparison import over_seeds, paired_gain, reading, run_figures
from fedalora.config import FedConfig
from fedalora.errors import ConfigError
from fedalora.launch import SimulationFailed, completed_run, ray_cluster
from fedalora.launch.simulate import run_simulation
from fedalora.methods import method_class, registered_methods
from fedalora.outputs import LOCAL_MODEL, PROTOCOLS, run_status
from fedalora.run_config import format_run_config, parse_run_config
from fedalora.stats import Interval
from server.in_process import flower_log_in, run_in_process

ROOT = Path(__file__).resolve().parents[1]
LOCAL, CENTRALISED = "local", "centralised"
#: Each run's wall seconds, in the output directory (kept by ``--resume``).
WALLS = "wall_seconds.json"
#: The method every other is compared with, per setting.
BASELINE = {"homogeneous": "fedalora", "heterogeneous": "fedalora-hetero"}


@dataclass(frozen=True)
class Preset:
    """One track at one size: the run-config every run shares, the rank settings, the
    methods per setting (``local`` and ``centralised`` are added) and the seeds."""

    num_clients: int
    metric: str
    run_config: dict[str, object]
    settings: dict[str, str]
    strategies: dict[str, list[str]]
    seeds: int = 3
    note: str = ""
    #: Rows that are a method with run-config of its own: label -> (strategy, run-config).
    rows: dict[str, tuple[str, dict[str, object]]] = field(default_factory=dict)

    def method(self, label: str) -> tuple[str, dict[str, object]]:
        """The strategy and extra run-config of a row."""
        return self.rows.get(label, (label, {}))


CLASSIFICATION = {
    "model": "minilm",
    "dataset": "20newsgroups",
    "partitioning": "dirichlet:0.5",
    "clients-per-group": 3,
    "max-length": 48,
    "test-fraction": 0.1,
    "export-adapters": False,
    "fraction-evaluate": 0.0,
}
INSTRUCTION = {
    "model": "smollm2",
    "dataset": "instructions",
    "partitioning": "task",
    "export-adapters": False,
    "fraction-evaluate": 0.0,
}
INSTRUCTION_DEFAULT = {
    **INSTRUCTION,
    "clients-per-group": 3,
    "num-server-rounds": 2,
    "local-steps": 6,
    "batch-size": 4,
    "lr": 0.003,
    "max-length": 64,
    "max-new-tokens": 6,
    "test-fraction": 0.4,
    # the paper's protocol only, in the last round: scoring is most of an LLM run's time
    "local-model-scoring": "final-round",
    "final-evaluation": False,
}
#: Rows of a method with run-config of its own (LoRI's two forms, LoRA variants).
VARIANT_ROWS: dict[str, tuple[str, dict[str, object]]] = {
    "lori-d": ("lori", {"lori-sparsity": 0.0}),
    "lori-s": ("lori", {"lori-sparsity": 0.9}),
    "fedalora-dora": ("fedalora", {"dora": True}),
    "fedalora-lora-plus": ("fedalora", {"lora-plus-ratio": 16.0}),
}
PRESETS = {
    ("classification", "default"): Preset(
        12,
        "accuracy",
        {**CLASSIFICATION, "num-server-rounds": 3, "local-steps": 8, "batch-size": 8, "lr": 0.01},
        {"homogeneous": "8", "heterogeneous": "64,16,8"},
        {
            "homogeneous": ["fedalora", "fedit", "flexlora"],
            "heterogeneous": [
                "fedalora-hetero",
                "zeropad",
                "hetlora",
                "ffa-lora",
                "flexlora",
                "flora",
            ],
        },
        note="4 Dirichlet groups x 3 clients (ranks 64, 16, 8 in every group)",
    ),
    ("classification", "smoke"): Preset(
        3,
        "accuracy",
        {
            "model": "minilm",
            "num-hidden-layers": 2,
            "dataset": "bbc-news",
            "partitioning": "iid",
            "clients-per-group": 3,
            "num-server-rounds": 1,
            "local-steps": 2,
            "batch-size": 8,
            "max-length": 32,
            "test-fraction": 0.05,
            "export-adapters": False,
        },
        {"heterogeneous": "8,4,2"},
        {"heterogeneous": ["fedalora-hetero", "zeropad"]},
        seeds=2,
    ),
    ("classification", "methods"): Preset(
        12,
        "accuracy",
        {**CLASSIFICATION, "num-server-rounds": 3, "local-steps": 8, "batch-size": 8, "lr": 0.01},
        {"homogeneous": "8", "heterogeneous": "64,16,8"},
        {
            "homogeneous": [
                "fedalora",
                "fedalora-dora",
                "fedalora-lora-plus",
                "lori-d",
                "lori-s",
                "masa",
            ],
            "heterogeneous": ["fedalora-hetero", "lori-s", "masa"],
        },
        seeds=2,
        note="the default preset's design; the founding texts' methods and two LoRA variants "
        "beside Fed-ALoRA",
        rows=VARIANT_ROWS,
    ),
    ("instruction", "default"): Preset(
        24,
        "rouge1",
        INSTRUCTION_DEFAULT,
        {"heterogeneous": "64,16,8"},
        {"heterogeneous": ["fedalora-hetero", "zeropad"]},
        seeds=2,
        note="8 tasks x 3 clients (ranks 64, 16, 8 on every task), scored in the last round only",
    ),
    ("instruction", "methods"): Preset(
        24,
        "rouge1",
        INSTRUCTION_DEFAULT,
        {"heterogeneous": "64,16,8"},
        {"heterogeneous": ["fedalora-hetero", "lori-d", "lori-s", "masa"]},
        seeds=2,
        note="the default preset's design; the founding texts' methods beside Fed-ALoRA",
        rows=VARIANT_ROWS,
    ),
    ("instruction", "smoke"): Preset(
        3,
        "rouge1",
        {
            **INSTRUCTION,
            "num-hidden-layers": 2,
            "partitioning": "iid",
            "num-server-rounds": 1,
            "local-steps": 1,
            "batch-size": 4,
            "max-length": 48,
            "max-new-tokens": 2,
            "test-fraction": 0.05,
        },
        {"heterogeneous": "8,4,2"},
        {"heterogeneous": ["fedalora-hetero"]},
        seeds=1,
    ),
    ("instruction", "paper"): Preset(
        8,
        "rouge1",
        {
            **INSTRUCTION,
            "num-server-rounds": 11,
            "local-steps": 60,
            "batch-size": 64,
            "lr": 5e-4,
            "lora-dropout": 0.05,
            "max-length": 128,
            "max-new-tokens": 16,
            "test-fraction": 0.2,
            "fraction-evaluate": 1.0,
        },
        {"homogeneous": "8", "heterogeneous": "64,64,32,32,16,16,8,8"},
        {
            "homogeneous": ["fedalora", "fedit", "fedsa-lora"],
            "heterogeneous": ["fedalora-hetero", "zeropad"],
        },
        note="the paper's design (one task per client, its ranks, 11 rounds of about 10 "
        "epochs at batch 64, lr 5e-4); meant for a GPU",
    ),
}


@dataclass(frozen=True)
class Run:
    setting: str
    strategy: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}-{self.strategy}-s{self.seed}"


@dataclass
class Grid:
    preset: Preset
    extra: dict[str, object]
    output_dir: Path
    mode: str
    nodes: int = 1
    walls: dict[str, float] = field(default_factory=dict)

    def run_config(self, run: Run) -> dict[str, object]:
        """The run's run-config: the preset's, the extra keys, its ranks and seed, and
        only the method options that its method takes."""
        options = {k for c in registered_methods().values() for k in c.Options.fields_by_key()}
        strategy, row_config = self.preset.method(run.strategy)
        own = (
            set()
            if strategy == CENTRALISED
            else set(method_class(strategy).Options.fields_by_key())
        )
        merged = {
            **self.preset.run_config,
            **row_config,
            **self.hosting,
            **self.extra,
            "ranks": self.preset.settings[run.setting],
            "seed": run.seed,
        }
        return {k: v for k, v in merged.items() if k not in options or k in own}

    @property
    def hosting(self) -> dict[str, object]:
        """How the preset's clients sit on the grid's nodes: cohorts of them when there
        are fewer nodes than clients."""
        if self.nodes >= self.preset.num_clients:
            return {}
        return {"num-clients": self.preset.num_clients, "min-nodes": min(2, self.nodes)}

    @classmethod
    def at(
        cls,
        preset: Preset,
        extra: dict[str, object],
        output_dir: Path,
        mode: str,
        resume: bool,
        nodes: int = 1,
    ) -> Grid:
        """A grid writing into ``output_dir`` with its clients on ``nodes`` nodes; with
        ``resume``, the wall seconds of the runs it already holds."""
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        walls = output_dir / WALLS
        saved = json.loads(walls.read_text()) if resume and walls.exists() else {}
        return cls(preset, extra, output_dir, mode, min(nodes, preset.num_clients), saved)

    def execute_all(self, runs: list[Run], ray_address: str | None, resume: bool) -> None:
        """Every run in turn, its wall seconds saved after each; with ``resume`` the runs
        already completed are kept."""
        bar = tqdm(runs, unit="run", dynamic_ncols=True)
        for run in bar:
            bar.set_description(run.name)
            if (
                resume
                and run.name in self.walls
                and run_status(self.output_dir / run.name) == "completed"
            ):
                continue
            try:
                self.execute(run, ray_address)
            except (SimulationFailed, ConfigError) as exc:
                raise SystemExit(f"{run.name} failed: {exc}; see {self.output_dir}/logs") from exc
            (self.output_dir / WALLS).write_text(json.dumps(self.walls, indent=2))

    def execute(self, run: Run, ray_address: str | None) -> None:
        """One run; its wall seconds (start-up included) go to ``walls``."""
        run_config = self.run_config(run)
        strategy = self.preset.method(run.strategy)[0]
        log = self.output_dir / "logs" / f"{run.name}.log"
        started = time.perf_counter()
        if strategy == CENTRALISED:
            config = {**run_config, "run-name": run.name, "output-dir": str(self.output_dir)}
            with flower_log_in(log):
                run_centralised(
                    FedConfig.from_run_config(config),
                    self.preset.num_clients,
                    self.output_dir / run.name,
                )
        elif self.mode == "in-process":
            run_in_process(
                ROOT,
                run.name,
                num_supernodes=self.nodes,
                run_config=format_run_config({**run_config, "strategy": strategy}),
                output_dir=self.output_dir,
                log_path=log,
            )
            completed_run(self.output_dir / run.name, log)
        else:
            run_simulation(
                ROOT,
                run.name,
                num_supernodes=self.nodes,
                run_config=format_run_config({**run_config, "strategy": strategy}),
                output_dir=self.output_dir,
                ray_address=ray_address,
                log_path=log,
                flwr_home=self.output_dir / ".flwr-home",
            )
        self.walls[run.name] = time.perf_counter() - started


def plan(
    preset: Preset, settings: list[str], strategies: list[str] | None, seeds: list[int]
) -> list[Run]:
    """The runs: for every setting the methods that can take its ranks (``strategies``,
    else the preset's), then ``local`` and ``centralised``, each with every seed."""
    runs = []
    for setting in settings:
        heterogeneous = len(set(preset.settings[setting].split(","))) > 1
        chosen = [
            s for s in strategies or preset.strategies[setting] if s not in (LOCAL, CENTRALISED)
        ]
        chosen = [
            s
            for s in chosen
            if not heterogeneous or method_class(preset.method(s)[0]).heterogeneous
        ]
        runs += [Run(setting, s, seed) for s in [*chosen, LOCAL, CENTRALISED] for seed in seeds]
    return runs


def figures_of(grid: Grid, runs: list[Run], metric: str, protocol: str) -> pd.DataFrame:
    """Every run's figures (one row per run), Delta_m% against the ``local`` run of the
    same setting and seed."""
    rows = []
    for run in runs:
        reference = grid.output_dir / Run(run.setting, LOCAL, run.seed).name
        figures = run_figures(grid.output_dir / run.name, reference, metric, protocol)
        figures["wall_seconds"] = grid.walls.get(run.name, figures["wall_seconds"])
        rows.append({"setting": run.setting, "strategy": run.strategy, "seed": run.seed, **figures})
    return pd.DataFrame(rows)


def summary_table(per_run: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per setting and method: every figure's mean and interval over the seeds, and the
    paired difference of the mean metric against the setting's baseline; and the
    readings of those differences."""
    rows, readings = [], []
    for (setting, strategy), runs in per_run.groupby(["setting", "strategy"], sort=False):
        per_seed = _records(runs)
        row: dict[str, Any] = {"setting": setting, "strategy": strategy, "seeds": len(per_seed)}
        for key, interval in over_seeds(per_seed).items():
            row.update(
                {key: interval.mean, f"{key}_low": interval.low, f"{key}_high": interval.high}
            )
        baseline_name = BASELINE.get(str(setting))
        baseline = per_run[(per_run["setting"] == setting) & (per_run["strategy"] == baseline_name)]
        if baseline_name and strategy != baseline_name and not baseline.empty:
            gain = paired_gain(per_seed, _records(baseline))
            row.update({"gain": gain.mean, "gain_low": gain.low, "gain_high": gain.high})
            readings.append(reading(gain, f"{setting}: {strategy} vs {baseline_name}, mean"))
        rows.append(row)
    return pd.DataFrame(rows), readings


COLUMNS = {
    "mean": "mean",
    "worst": "worst",
    "worst_10pct": "worst-10%",
    "jain": "Jain",
    "delta_m_pct": "Delta_m%",
    "rank_gap": "low-high rank gap",
    "global_accuracy": "official test",
    "bytes_up_per_client_round": "MB up",
    "bytes_down_per_client_round": "MB down",
    "wall_seconds": "wall s",
    "gain": "mean vs Fed-ALoRA (paired)",
}


def markdown(table: pd.DataFrame, header: str, readings: list[str]) -> str:
    """The summary table, each cell 'mean ± half-width of the 95% interval'."""
    shown = [c for c in COLUMNS if c in table and table[c].notna().any()]
    lines = [
        "| setting | method | seeds | " + " | ".join(COLUMNS[c] for c in shown) + " |",
        "|---|---|---:|" + "---:|" * len(shown),
    ]
    for _, row in table.iterrows():
        cells = [_cell(row, c) for c in shown]
        lines.append(
            f"| {row['setting']} | {row['strategy']} | {row['seeds']} | " + " | ".join(cells) + " |"
        )
    return (
        header + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {r}" for r in readings) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--track", choices=["classification", "instruction"], default="classification"
    )
    parser.add_argument(
        "--preset", default="default", help="default, smoke, or (instruction) paper"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per run (preset's)")
    parser.add_argument("--first-seed", type=int, default=42)
    parser.add_argument("--settings", default=None, help="comma-separated (preset's)")
    parser.add_argument("--strategies", default=None, help="comma-separated (preset's)")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=LOCAL_MODEL,
        help="local-model (the paper's) or evaluate (after aggregation)",
    )
    parser.add_argument(
        "--mode",
        choices=["in-process", "ray"],
        default="in-process",
        help="each run in one process (same results) or on one Ray cluster",
    )
    parser.add_argument("--num-clients", type=int, default=None)
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="nodes hosting the clients as cohorts (1: all on one node, trained together); "
        "the number of clients gives one client per node",
    )
    parser.add_argument(
        "--run-config",
        default="",
        help='extra key=value pairs for every run, e.g. "num-server-rounds=3"',
    )
    parser.add_argument("--output-dir", default=None, help="default: outputs/grid-<track>-<preset>")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep runs that already completed in the output directory",
    )
    args = parser.parse_args()
    if (args.track, args.preset) not in PRESETS:
        parser.error(
            f"no preset '{args.preset}' for track '{args.track}'; choose one of "
            f"{[p for t, p in PRESETS if t == args.track]}"
        )
    preset = PRESETS[(args.track, args.preset)]
    if args.num_clients:
        preset = replace(preset, num_clients=args.num_clients)
    extra = parse_run_config(args.run_config)
    for ranks in preset.settings.values():  # fail before any run
        FedConfig.from_run_config({**preset.run_config, **extra, "ranks": ranks})
    settings = args.settings.split(",") if args.settings else list(preset.settings)
    if unknown := [s for s in settings if s not in preset.settings]:
        parser.error(f"--settings: unknown {unknown}; choose from {list(preset.settings)}")
    strategies = args.strategies.split(",") if args.strategies else None
    known = [*registered_methods(), *preset.rows, CENTRALISED]
    if bad := [s for s in strategies or [] if s not in known]:
        parser.error(f"--strategies: unknown {bad}; choose from {known}")
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or preset.seeds)))
    output_dir = Path(args.output_dir or ROOT / "outputs" / f"grid-{args.track}-{args.preset}")
    output_dir = output_dir.resolve()
    grid = Grid.at(preset, extra, output_dir, args.mode, args.resume, args.nodes)
    runs = plan(preset, settings, strategies, seeds)
    started = time.perf_counter()
    with ray_cluster() if args.mode == "ray" else contextlib.nullcontext() as ray_address:
        grid.execute_all(runs, ray_address, args.resume)
    per_run = figures_of(grid, runs, preset.metric, args.protocol)
    per_run.to_csv(output_dir / "runs.csv", index=False)
    table, readings = summary_table(per_run)
    table.to_csv(output_dir / "table.csv", index=False)
    command = "python benchmarks/grid.py " + " ".join(sys.argv[1:])
    header = (
        f"Track `{args.track}`, preset `{args.preset}`: {preset.num_clients} clients"
        f"{', ' + preset.note if preset.note else ''}; metric `{preset.metric}` under the "
        f"`{args.protocol}` protocol; run-config {json.dumps({**preset.run_config, **extra})}; "
        f"mode `{args.mode}`, the clients on {grid.nodes} node(s).\n"
        f"Seeds {seeds[0]}..{seeds[-1]}: every cell is the mean over "
        f"{len(seeds)} seeds ± the half-width of its 95% Student-t interval; differences "
        f"are paired by seed.\nCommand: `{command.strip()}`; machine: {platform.node()} "
        f"({os.cpu_count()} CPUs, {platform.machine()}); date: "
        f"{datetime.date.today().isoformat()}; the runs took "
        f"{sum(grid.walls.values()) / 60:.1f} min in all."
    )
    text = markdown(table, header, readings)
    (output_dir / "table.md").write_text(text)
    print(text)
    print(
        f"this invocation took {(time.perf_counter() - started) / 60:.1f} min; wrote "
        f"{output_dir / 'table.md'}, table.csv and runs.csv"
    )


def _records(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """The runs' figures, one mapping per seed, in seed order."""
    return [
        {str(k): v for k, v in row.items()} for row in runs.sort_values("seed").to_dict("records")
    ]


def _cell(row: pd.Series, key: str) -> str:
    value = row[key]
    if pd.isna(value):
        return ""
    scale = 1e-6 if key.startswith("bytes") else 1.0
    low, high = row.get(f"{key}_low", math.nan), row.get(f"{key}_high", math.nan)
    digits = 0 if key == "wall_seconds" else 3
    text = f"{value * scale:+.{digits}f}" if key == "gain" else f"{value * scale:.{digits}f}"
    if pd.isna(low):
        return text
    interval = Interval(value, float(low), float(high), 2)
    suffix = "" if key != "gain" or interval.excludes_zero else " (n.s.)"
    return f"{text} ± {interval.half_width * scale:.{digits}f}{suffix}"


if __name__ == "__main__":
    main()
