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

import pandas as pd

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


def _seed(run_dir: Path) -> int:
    return int(json.loads((run_dir / CONFIG).read_text())["seed"])


def _official_test(run_dir: Path, protocol: str) -> float:
    frame = pd.DataFrame(read_jsonl(run_dir / METRICS))
    if "global_accuracy" not in frame:
        return math.nan
    rows = frame[(frame["phase"] == protocol) & frame["global_accuracy"].notna()]
    return float(rows["global_accuracy"].mean()) if len(rows) else math.nan
