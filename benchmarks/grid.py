"""The benchmark grid: strategy x setting (homogeneous r=8, heterogeneous
64,64,32,32,16,16,8,8) on one track, plus the ``local`` reference (Delta_m% is
computed against it) and the ``centralised`` ALoRA multi-task reference.

Every federated run is a real ``flwr run`` simulation (``fedalora.simulate``) on one
Ray cluster that the script starts and stops; the centralised reference runs in its
own process (``python -m fedalora.centralised``). Writes ``table.csv`` and
``table.md`` (per run: mean client metric, worst client, worst-10% mean, std, Jain's
index, Delta_m% against ``local``, bytes up and down per client per training round,
total wall seconds) into the output directory, next to the run directories.

    python benchmarks/grid.py                           # classification, default size
    python benchmarks/grid.py --track instruction --preset small
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from fedalora import fairness
from fedalora.config import FedConfig, parse_run_config
from fedalora.methods import registered_methods
from fedalora.outputs import read_jsonl
from fedalora.simulate import SimulationFailed, ray_cluster, run_simulation

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"homogeneous": "8", "heterogeneous": "64,64,32,32,16,16,8,8"}
REFERENCES = ("local", "centralised")
#: Per setting, the strategies of the default grid (``local`` and ``centralised`` added).
DEFAULT_STRATEGIES = {
    "homogeneous": ["fedalora", "fedit", "fedsa-lora", "ffa-lora", "flexlora", "flora"],
    "heterogeneous": ["fedalora-hetero", "zeropad", "hetlora", "ffa-lora", "flexlora", "flora"],
}


@dataclass(frozen=True)
class Preset:
    """One track at one size: the run-config every run of the grid shares."""

    num_clients: int
    metric: str
    run_config: dict[str, object] = field(default_factory=dict)
    strategies: dict[str, list[str]] = field(default_factory=lambda: DEFAULT_STRATEGIES)


PRESETS = {
    ("classification", "default"): Preset(
        10,
        "accuracy",
        {
            "model": "minilm",
            "dataset": "20newsgroups",
            "partitioning": "dirichlet:0.5",
            "num-server-rounds": 4,
            "local-steps": 8,
            "batch-size": 8,
            "lr": 0.005,
            "max-length": 48,
            "test-fraction": 0.1,
            "global-test-examples": 200,
            "export-adapters": False,
        },
    ),
    ("classification", "smoke"): Preset(
        3,
        "accuracy",
        {
            "model": "minilm",
            "num-hidden-layers": 2,
            "dataset": "bbc-news",
            "partitioning": "iid",
            "num-server-rounds": 1,
            "local-steps": 2,
            "batch-size": 8,
            "max-length": 32,
        },
    ),
    ("instruction", "small"): Preset(
        8,
        "rouge1",
        {
            "model": "smollm2",
            "dataset": "instructions",
            "partitioning": "task",
            "num-server-rounds": 2,
            "local-steps": 8,
            "batch-size": 4,
            "lr": 0.003,
            "max-length": 64,
            "max-new-tokens": 6,
            "test-fraction": 0.05,
            "export-adapters": False,
        },
        {
            "homogeneous": ["fedalora", "fedit", "flexlora"],
            "heterogeneous": ["fedalora-hetero", "zeropad", "flexlora"],
        },
    ),
    ("instruction", "smoke"): Preset(
        3,
        "rouge1",
        {
            "model": "smollm2",
            "num-hidden-layers": 2,
            "dataset": "instructions",
            "partitioning": "iid",
            "num-server-rounds": 1,
            "local-steps": 1,
            "batch-size": 4,
            "max-length": 48,
            "max-new-tokens": 2,
            "test-fraction": 0.01,
            "export-adapters": False,
        },
    ),
}


def plan(
    settings: list[str],
    strategies: list[str] | None,
    defaults: dict[str, list[str]] = DEFAULT_STRATEGIES,
) -> list[tuple[str, str]]:
    """(setting, strategy) pairs to run (``strategies``, else the ``defaults`` of each
    setting); strategies that cannot take a setting's ranks are left out of it, and
    every setting gets both references."""
    runs = []
    for setting in settings:
        heterogeneous = len(set(SETTINGS[setting].split(","))) > 1
        chosen = strategies or defaults[setting]
        for name in chosen:
            if name in REFERENCES or (
                heterogeneous and not registered_methods()[name].heterogeneous
            ):
                continue
            runs.append((setting, name))
        runs += [(setting, name) for name in REFERENCES]
    return runs


def run_one(
    setting: str,
    strategy: str,
    preset: Preset,
    extra: dict[str, object],
    output_dir: Path,
    ray_address: str,
    log_dir: Path,
) -> float:
    """One run of the grid; returns its wall seconds (start-up included)."""
    run_config = {**preset.run_config, **extra, "ranks": SETTINGS[setting]}
    FedConfig.from_run_config({**run_config, "strategy": "fedalora-hetero"})  # fail early
    name = f"{setting}-{strategy}"
    started = time.perf_counter()
    if strategy == "centralised":
        text = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        with (log_dir / f"{name}.log").open("w") as log:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fedalora.centralised",
                    "--num-clients",
                    str(preset.num_clients),
                    "--run-config",
                    text,
                    "--output-dir",
                    str(output_dir),
                    "--run-name",
                    name,
                ],
                cwd=ROOT,
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    else:
        text = " ".join(f"{k}={_toml(v)}" for k, v in {**run_config, "strategy": strategy}.items())
        run_simulation(
            ROOT,
            name,
            num_supernodes=preset.num_clients,
            run_config=text,
            output_dir=output_dir,
            ray_address=ray_address,
            log_path=log_dir / f"{name}.log",
            flwr_home=output_dir / ".flwr-home",
        )
    return time.perf_counter() - started


def results_table(
    output_dir: Path, runs: list[tuple[str, str]], metric: str, walls: dict[str, float]
) -> pd.DataFrame:
    """One row per finished run, Delta_m% against the ``local`` run of its setting."""
    rows = []
    for setting, strategy in runs:
        run_dir = output_dir / f"{setting}-{strategy}"
        reference = output_dir / f"{setting}-local"
        ref = (
            fairness.client_scores(reference, metric)["metric"]
            if (reference / "summary.json").exists()
            else None
        )
        scores = fairness.client_scores(run_dir, metric)
        tiers = scores.groupby("rank")["metric"].mean()
        row = {
            "setting": setting,
            "strategy": strategy,
            **fairness.summarise(scores["metric"], ref),
            "lowest_rank_mean": float(tiers.iloc[0]),
            "highest_rank_mean": float(tiers.iloc[-1]),
            **fairness.communication(run_dir),
            "wall_seconds": walls.get(run_dir.name, float("nan")),
        }
        frame = pd.DataFrame(read_jsonl(run_dir / "metrics.jsonl"))
        final = frame[(frame["phase"] == "evaluate") & (frame["round"] == frame["round"].max())]
        for column, name in (
            ("global_accuracy", "official_test_mean"),
            ("exact_match", "exact_match_mean"),
        ):
            if column in final:
                row[name] = float(final[column].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, header: str) -> str:
    columns = {
        "setting": "setting",
        "strategy": "strategy",
        "mean": "mean",
        "worst": "worst",
        "worst_10pct": "worst-10%",
        "std": "std",
        "jain": "Jain",
        "delta_m_pct": "Delta_m%",
        "lowest_rank_mean": "lowest-rank mean",
        "highest_rank_mean": "highest-rank mean",
        "official_test_mean": "official test",
        "exact_match_mean": "exact match",
        "bytes_up_per_client_round": "MB up",
        "bytes_down_per_client_round": "MB down",
        "wall_seconds": "wall s",
    }
    shown = table[[c for c in columns if c in table]].copy()
    for col in ("bytes_up_per_client_round", "bytes_down_per_client_round"):
        shown[col] = shown[col] / 1e6
    shown["wall_seconds"] = shown["wall_seconds"].map(lambda v: "" if v != v else f"{v:.0f}")
    lines = [
        "| " + " | ".join(columns[str(c)] for c in shown) + " |",
        "|" + "---|" * len(shown.columns),
    ]
    for _, row in shown.iterrows():
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return header + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--track", choices=["classification", "instruction"], default="classification"
    )
    parser.add_argument(
        "--preset", default=None, help="default (classification), small (instruction) or smoke"
    )
    parser.add_argument("--settings", default="homogeneous,heterogeneous")
    parser.add_argument(
        "--strategies", default=None, help="comma-separated (default: the grid's list per setting)"
    )
    parser.add_argument("--partitioning", default=None, help="e.g. iid, dirichlet:0.1")
    parser.add_argument("--num-clients", type=int, default=None)
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
    preset_name = args.preset or ("default" if args.track == "classification" else "small")
    if (args.track, preset_name) not in PRESETS:
        parser.error(
            f"no preset '{preset_name}' for track '{args.track}'; choose one of "
            f"{[p for t, p in PRESETS if t == args.track]}"
        )
    preset = PRESETS[(args.track, preset_name)]
    if args.num_clients:
        preset = Preset(args.num_clients, preset.metric, preset.run_config, preset.strategies)
    extra = parse_run_config(args.run_config)
    if args.partitioning:
        extra["partitioning"] = args.partitioning
    settings = [s.strip() for s in args.settings.split(",")]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    strategies = [s.strip() for s in args.strategies.split(",")] if args.strategies else None
    known = [*registered_methods(), *REFERENCES]
    bad = [s for s in strategies or [] if s not in known]
    if bad:
        parser.error(f"--strategies: unknown {bad}; choose from {known}")
    output_dir = Path(args.output_dir or ROOT / "outputs" / f"grid-{args.track}-{preset_name}")
    output_dir = output_dir.resolve()
    log_dir = output_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = plan(settings, strategies, preset.strategies)
    walls_file = output_dir / "wall_seconds.json"
    walls = json.loads(walls_file.read_text()) if args.resume and walls_file.exists() else {}
    started = time.perf_counter()
    with ray_cluster() as ray_address:
        bar = tqdm(runs, unit="run", dynamic_ncols=True)
        for setting, strategy in bar:
            name = f"{setting}-{strategy}"
            bar.set_description(name)
            if args.resume and name in walls and _completed(output_dir / name):
                continue
            try:
                walls[name] = run_one(
                    setting, strategy, preset, extra, output_dir, ray_address, log_dir
                )
            except (SimulationFailed, subprocess.CalledProcessError) as exc:
                raise SystemExit(f"{name} failed: {exc}; see {log_dir / name}.log") from exc
            walls_file.write_text(json.dumps(walls, indent=2))
    elapsed = time.perf_counter() - started
    table = results_table(output_dir, runs, preset.metric, walls)
    table.to_csv(output_dir / "table.csv", index=False)
    command = "python benchmarks/grid.py " + " ".join(sys.argv[1:])
    header = (
        f"Track `{args.track}`, preset `{preset_name}` ({preset.num_clients} clients, "
        f"metric `{preset.metric}`, {json.dumps({**preset.run_config, **extra})}).\n"
        f"Command: `{command.strip()}`; machine: {platform.node()} "
        f"({os.cpu_count()} CPUs, {platform.machine()}); date: "
        f"{datetime.date.today().isoformat()}; the runs took {sum(walls.values()) / 60:.1f} "
        "min in all."
    )
    (output_dir / "table.md").write_text(markdown(table, header))
    print(markdown(table, header))
    print(
        f"this invocation took {elapsed / 60:.1f} min; wrote {output_dir / 'table.csv'} "
        f"and {output_dir / 'table.md'}"
    )


def _completed(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "completed"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"'{value}'" if isinstance(value, str) else str(value)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.3f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


if __name__ == "__main__":
    main()
