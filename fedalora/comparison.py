"""Comparisons of methods over several seeds, with their uncertainty.

A *method* here is a set of runs whose configuration differs in the seed only (and in
where the run was written); each run gives one value of every figure
(``run_figures``), and a method's figure is the mean over its seeds with a Student-t
confidence interval (``fedalora.stats``). Differences between two methods are paired
by seed (the same seed gives both the same data split and initialisation). Used by
``benchmarks/grid.py`` and the client-fairness notebook.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import fairness
from .outputs import CONFIG, LOCAL_MODEL, METRICS, SUMMARY, read_jsonl
from .stats import Interval, mean_interval, paired_difference

#: Configuration keys that tell the runs of one method apart.
REPETITION_KEYS = frozenset({"seed", "run-name", "output-dir", "export-adapters", "resume"})
#: The figures of a run that are compared, in table order.
FIGURES = (
    "mean",
    "worst",
    "worst_10pct",
    "std",
    "jain",
    "delta_m_pct",
    "lowest_rank_mean",
    "highest_rank_mean",
    "rank_gap",
    "global_accuracy",
    "bytes_up_per_client_round",
    "bytes_down_per_client_round",
    "wall_seconds",
)


def method_key(run_dir: str | Path) -> str:
    """A name for the runs that differ only in the seed: the strategy plus every other
    configuration value, as JSON."""
    config = json.loads((Path(run_dir) / CONFIG).read_text())
    kept = {k: v for k, v in config.items() if k not in REPETITION_KEYS and k != "clients"}
    return json.dumps(kept, sort_keys=True)


def group_runs(run_dirs: Iterable[str | Path]) -> dict[str, list[Path]]:
    """Runs grouped by method (``method_key``), in first-seen order, each group in seed
    order."""
    groups: dict[str, list[Path]] = {}
    for run_dir in map(Path, run_dirs):
        groups.setdefault(method_key(run_dir), []).append(run_dir)
    return {key: sorted(runs, key=_seed) for key, runs in groups.items()}


def run_figures(
    run_dir: str | Path,
    reference: str | Path | None = None,
    metric: str = "accuracy",
    protocol: str = LOCAL_MODEL,
) -> dict[str, float]:
    """One run's figures under ``protocol``: the fairness figures of its clients' latest
    scores (Delta_m% against ``reference``, a ``local`` run of the same seed), the mean
    of its lowest and highest rank tiers and the gap between them (within groups where
    groups mix ranks, else between the tiers), the official-test accuracy if scored,
    communication and wall seconds."""
    run_dir = Path(run_dir)
    scores = fairness.client_scores(run_dir, metric, None, protocol)
    ref = fairness.client_scores(reference, metric, None, protocol)["metric"] if reference else None
    tiers = scores.groupby("rank")["metric"].mean()
    gaps = fairness.rank_gaps(scores)
    rank_gap = (
        float(gaps["mean"].iloc[0]) if not gaps.empty else float(tiers.iloc[0] - tiers.iloc[-1])
    )
    summary = json.loads((run_dir / SUMMARY).read_text())
    return {
        **fairness.summarise(scores["metric"], ref),
        "lowest_rank_mean": float(tiers.iloc[0]),
        "highest_rank_mean": float(tiers.iloc[-1]),
        "rank_gap": rank_gap if len(tiers) > 1 else math.nan,
        "global_accuracy": _official_test(run_dir, protocol),
        **fairness.communication(run_dir),
        "wall_seconds": float(summary.get("wall_seconds") or math.nan),
    }


def over_seeds(
    per_seed: Sequence[Mapping[str, float]], confidence: float = 0.95
) -> dict[str, Interval]:
    """Every figure's mean over the seeds and its confidence interval."""
    keys = [k for k in FIGURES if any(k in figures for figures in per_seed)]
    return {
        k: mean_interval([figures.get(k, math.nan) for figures in per_seed], confidence)
        for k in keys
    }


def paired_gain(
    per_seed: Sequence[Mapping[str, float]],
    baseline: Sequence[Mapping[str, float]],
    figure: str = "mean",
    confidence: float = 0.95,
) -> Interval:
    """``figure`` of a method minus the baseline's, seed by seed (the two lists in the
    same seed order), with its interval."""
    return paired_difference(
        [f[figure] for f in per_seed], [f[figure] for f in baseline], confidence
    )


def reading(difference: Interval, what: str) -> str:
    """What an interval allows one to say: a resolved difference, or none."""
    if difference.n < 2:
        return f"{what}: {difference.mean:+.3f} from one seed; no interval, no reading"
    if not difference.excludes_zero:
        return (
            f"{what}: no difference resolved ({difference.mean:+.3f} ± {difference.half_width:.3f})"
        )
    direction = "higher" if difference.mean > 0 else "lower"
    return (
        f"{what}: {direction} by {abs(difference.mean):.3f} ± {difference.half_width:.3f} "
        f"({difference.confidence:.0%} interval over {difference.n} seeds)"
    )


def method_label(run_dir: str | Path) -> str:
    """A short name for a method's runs: its strategy and ranks, and its noise multiplier
    and clip bound under client-level DP."""
    config = json.loads((Path(run_dir) / CONFIG).read_text())
    label = f"{config['strategy']} (ranks {config['ranks']})"
    if config.get("dp-noise-multiplier", 0) > 0:
        label += f", DP z={config['dp-noise-multiplier']:.3g} C={config['dp-clip']:.3g}"
    return label


#: The figures a privacy-utility comparison shows.
PRIVACY_FIGURES = ("mean", "worst", "lowest_rank_mean", "highest_rank_mean")


def privacy_utility(
    run_dirs: Iterable[str | Path], metric: str = "accuracy", protocol: str = LOCAL_MODEL
) -> pd.DataFrame:
    """Per (strategy, ranks, noise multiplier): the runs' final epsilon (inf without DP)
    and each of ``PRIVACY_FIGURES`` as the mean over seeds with its interval
    (``<figure>``, ``<figure>_low``, ``<figure>_high``), sorted by epsilon."""
    rows = []
    for runs in group_runs(run_dirs).values():
        config = json.loads((runs[0] / CONFIG).read_text())
        noise = float(config.get("dp-noise-multiplier", 0.0))
        epsilons = [
            json.loads((run / SUMMARY).read_text()).get("epsilon", math.inf) for run in runs
        ]
        per_seed = [run_figures(run, None, metric, protocol) for run in runs]
        row: dict[str, object] = {
            "strategy": config["strategy"],
            "ranks": config["ranks"],
            "noise_multiplier": noise,
            "epsilon": float(max(epsilons)) if noise > 0 else math.inf,
            "seeds": len(runs),
        }
        for figure in PRIVACY_FIGURES:
            interval = mean_interval([f[figure] for f in per_seed])
            row.update(
                {
                    figure: interval.mean,
                    f"{figure}_low": interval.low,
                    f"{figure}_high": interval.high,
                }
            )
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(["strategy", "ranks", "epsilon"]).reset_index(drop=True)


def plot_privacy_utility(table: pd.DataFrame, metric: str = "accuracy") -> Figure:
    """``privacy_utility``'s table against epsilon (log scale; runs without DP at the
    right, marked "no DP"): mean and worst client on the left, lowest and highest rank
    tier on the right, each with its 95% interval over seeds."""
    finite = table.loc[np.isfinite(table["epsilon"]), "epsilon"]
    no_dp = float(finite.max() * 3) if len(finite) else 1.0
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    panels = (("mean", "worst"), ("lowest_rank_mean", "highest_rank_mean"))
    for ax, pair in zip(axes, panels, strict=True):
        for i, ((strategy, ranks), rows) in enumerate(table.groupby(["strategy", "ranks"])):
            x = np.where(np.isfinite(rows["epsilon"]), rows["epsilon"], no_dp)
            for figure_name, style in zip(pair, ("-", ":"), strict=True):
                errors = np.nan_to_num(
                    [
                        rows[figure_name] - rows[f"{figure_name}_low"],
                        rows[f"{figure_name}_high"] - rows[figure_name],
                    ]
                )
                ax.errorbar(
                    x * (1 + 0.03 * i),
                    rows[figure_name],
                    yerr=errors,
                    linestyle=style,
                    marker="o",
                    capsize=3,
                    color=f"C{i}",
                    label=f"{strategy} ({ranks}): {figure_name.replace('_', ' ')}",
                )
        ax.set_xscale("log")
        ticks = [*sorted(set(finite.round(2))), no_dp]
        ax.set_xticks(ticks, [*(f"{t:g}" for t in ticks[:-1]), "no DP"])
        ax.minorticks_off()
        ax.set_xlabel("epsilon (client level)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel(metric)
    axes[0].set_title("mean (solid) and worst (dotted) client")
    axes[1].set_title("lowest (solid) and highest (dotted) rank tier")
    figure.tight_layout()
    return figure


def _seed(run_dir: Path) -> int:
    return int(json.loads((run_dir / CONFIG).read_text())["seed"])


def _official_test(run_dir: Path, protocol: str) -> float:
    frame = pd.DataFrame(read_jsonl(run_dir / METRICS))
    if "global_accuracy" not in frame:
        return math.nan
    rows = frame[(frame["phase"] == protocol) & frame["global_accuracy"].notna()]
    return float(rows["global_accuracy"].mean()) if len(rows) else math.nan
