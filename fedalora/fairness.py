"""Client-fairness metrics over run directories.

Per client i with metric m_i on its own test data (accuracy by default):
mean, worst client, worst-10% mean, standard deviation (population), Jain's index
(sum m)^2 / (K sum m^2), Gini coefficient, and
Delta_m% = (1/K) sum_i (m_ref,i - m_i) / m_ref,i * 100 against each client's
local-only result (lower is better). Every figure can be broken down by rank tier,
and ``rank_gaps`` compares ranks within data groups (clients that share one data
distribution), so that rank is not confounded with data. Scores are read under the
paper's protocol (each client's local model right after its last local training,
``local-model``) unless ``protocol='evaluate'`` (its model after the last aggregation).
Plain functions over pandas objects, read from the files a run writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .outputs import CONFIG, LOCAL_MODEL, METRICS, PROTOCOLS, SUMMARY, read_jsonl
from .stats import mean_interval


# ------------------------------------------------------------- the metrics
def worst_fraction_mean(values: Sequence[float], fraction: float = 0.1) -> float:
    """Mean of the worst ceil(fraction * K) values (at least one)."""
    ordered = np.sort(np.asarray(values, dtype=float))
    return float(ordered[: max(1, math.ceil(fraction * len(ordered)))].mean())


def jain_index(values: Sequence[float]) -> float:
    """(sum m)^2 / (K sum m^2): 1 when every client scores the same, 1/K at worst."""
    m = np.asarray(values, dtype=float)
    square_sum = float(np.sum(m**2))
    return float(np.sum(m) ** 2 / (len(m) * square_sum)) if square_sum > 0 else 1.0


def gini(values: Sequence[float]) -> float:
    """sum_i sum_j |m_i - m_j| / (2 K^2 mean): 0 for equal scores."""
    m = np.asarray(values, dtype=float)
    mean = m.mean()
    if mean == 0:
        return 0.0
    return float(np.abs(m[:, None] - m[None, :]).sum() / (2 * len(m) ** 2 * mean))


def delta_m(values: pd.Series, reference: pd.Series) -> float:
    """Delta_m% = mean over clients of (m_ref - m) / m_ref * 100 (clients matched by index),
    over the clients whose reference is not 0 (the ratio is undefined for the others;
    ``summarise`` reports how many counted).

    Raises ValueError if a client has no reference, or if every reference is 0.
    """
    missing = values.index.difference(reference.index)
    if len(missing):
        raise ValueError(f"clients {list(missing)} have no reference (local-only) result")
    ref = reference.loc[values.index].astype(float)
    defined = ref != 0
    if not defined.any():
        raise ValueError("every reference metric is 0; Delta_m% is undefined")
    ratio = (ref[defined] - values[defined].astype(float)) / ref[defined]
    return float(ratio.mean() * 100)


def lorenz_curve(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative share of clients (x) against cumulative share of the metric (y), from 0."""
    m = np.sort(np.asarray(values, dtype=float))
    x = np.arange(len(m) + 1) / len(m)
    total = m.sum()
    y = np.concatenate([[0.0], np.cumsum(m) / total]) if total > 0 else x
    return x, y


def summarise(values: pd.Series, reference: pd.Series | None = None) -> dict[str, float]:
    """Every fairness figure of one set of client scores (indexed by client); Delta_m% is
    NaN when no client has a usable (present, non-zero) reference."""
    m = values.astype(float)
    figures = {
        "clients": len(m),
        "mean": float(m.mean()),
        "worst": float(m.min()),
        "worst_10pct": worst_fraction_mean(m.tolist()),
        "std": float(m.std(ddof=0)),
        "jain": jain_index(m.tolist()),
        "gini": gini(m.tolist()),
    }
    if reference is not None:
        counted = (
            int((reference.loc[m.index] != 0).sum()) if m.index.isin(reference.index).all() else 0
        )
        figures["delta_m_pct"] = delta_m(m, reference) if counted else math.nan
        figures["delta_m_clients"] = counted
    return figures


# --------------------------------------------------------- run directories
def client_scores(
    run_dir: str | Path,
    metric: str = "accuracy",
    server_round: int | None = None,
    protocol: str = LOCAL_MODEL,
) -> pd.DataFrame:
    """Every client's score under ``protocol`` (``local-model``, the paper's: its model
    right after its local training; ``evaluate``: its model after aggregation) in
    ``server_round``, or by default its latest, indexed by client, with its rank, its
    group (clients of one group share a data distribution: ``clients-per-group``) and
    its example count."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    frame = pd.DataFrame(read_jsonl(Path(run_dir) / METRICS))
    frame = frame[frame["phase"] == protocol]
    if frame.empty:
        raise ValueError(f"{run_dir} has no '{protocol}' rows in {METRICS}")
    if server_round is None:
        chosen = frame.sort_values("round").groupby("client").tail(1)
    else:
        chosen = frame[frame["round"] == server_round]
    scores = (
        chosen.set_index("client")
        .sort_index()[["rank", metric, "num_examples"]]
        .rename(columns={metric: "metric"})
    )
    config = json.loads((Path(run_dir) / CONFIG).read_text())
    per_group = int(config.get("clients-per-group", 1))
    return scores.assign(group=scores.index // per_group)


def primary_metric(run_dir: str | Path) -> str:
    """``rouge1`` for a run on instruction data, else ``accuracy``."""
    rows = read_jsonl(Path(run_dir) / METRICS)
    return "rouge1" if any("rouge1" in row for row in rows) else "accuracy"


def by_rank_tier(scores: pd.DataFrame, reference: pd.Series | None = None) -> pd.DataFrame:
    """``summarise`` for each rank (rows), from ``client_scores`` output."""
    rows = {}
    for rank, group in scores.groupby("rank"):
        rows[int(str(rank))] = summarise(group["metric"], reference)
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("rank")


def rank_gaps(scores: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Within-group (paired) rank gaps, from ``client_scores`` output: in every group
    that has clients of more than one rank, each client's score minus the score of the
    group's highest-rank client, then per rank the mean over groups with its Student-t
    interval (``mean``, ``low``, ``high``, ``groups``). Groups share a data
    distribution, so these differences are not confounded with data as a comparison of
    rank tiers across clients is. Empty when no group mixes ranks."""
    gaps: dict[int, list[float]] = {}
    for _, group in scores.groupby("group"):
        if group["rank"].nunique() < 2:
            continue
        top = group.loc[group["rank"] == group["rank"].max(), "metric"].mean()
        for rank, members in group.groupby("rank"):
            if int(str(rank)) != group["rank"].max():
                gaps.setdefault(int(str(rank)), []).append(float(members["metric"].mean() - top))
    rows = {}
    for rank, values in sorted(gaps.items()):
        interval = mean_interval(values, confidence)
        rows[rank] = {
            "mean": interval.mean,
            "low": interval.low,
            "high": interval.high,
            "groups": interval.n,
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("rank")


def over_rounds(
    run_dir: str | Path, metric: str = "accuracy", protocol: str = LOCAL_MODEL
) -> pd.DataFrame:
    """``summarise`` for every round of a run under ``protocol`` (rows by round)."""
    frame = pd.DataFrame(read_jsonl(Path(run_dir) / METRICS))
    rounds = sorted(frame.loc[frame["phase"] == protocol, "round"].unique())
    return pd.DataFrame.from_dict(
        {
            int(r): summarise(client_scores(run_dir, metric, int(r), protocol)["metric"])
            for r in rounds
        },
        orient="index",
    ).rename_axis("round")


def communication(run_dir: str | Path, phase: str = "train") -> dict[str, float]:
    """Mean bytes up and down per client per round of a run, in ``phase`` ('train': what
    the aggregation rule moves; 'evaluate' re-sends the aggregate for scoring)."""
    frame = pd.DataFrame(read_jsonl(Path(run_dir) / METRICS))
    frame = frame[frame["phase"] == phase]
    if frame.empty:
        return {"bytes_up_per_client_round": 0.0, "bytes_down_per_client_round": 0.0}
    per_client_round = frame.groupby(["round", "client"])[["bytes_up", "bytes_down"]].sum()
    return {
        "bytes_up_per_client_round": float(per_client_round["bytes_up"].mean()),
        "bytes_down_per_client_round": float(per_client_round["bytes_down"].mean()),
    }


def compare_runs(
    run_dirs: Iterable[str | Path],
    reference: str | Path | None = None,
    metric: str = "accuracy",
    protocol: str = LOCAL_MODEL,
) -> pd.DataFrame:
    """One row per run: strategy, ranks, the fairness figures of its clients' latest
    scores under ``protocol`` (Delta_m% against the ``reference`` run, e.g. a ``local``
    run), communication and wall time."""
    ref = client_scores(reference, metric, None, protocol)["metric"] if reference else None
    rows = []
    for run_dir in map(Path, run_dirs):
        config = json.loads((run_dir / CONFIG).read_text())
        summary = json.loads((run_dir / SUMMARY).read_text())
        rows.append(
            {
                "run": run_dir.name,
                "strategy": config["strategy"],
                "ranks": ",".join(str(c["rank"]) for c in config["clients"]),
                **summarise(client_scores(run_dir, metric, None, protocol)["metric"], ref),
                **communication(run_dir),
                "wall_seconds": summary.get("wall_seconds"),
            }
        )
    return pd.DataFrame(rows).set_index("run")


def main() -> None:
    """``python -m fedalora.fairness RUN_DIR ... [--reference LOCAL_RUN_DIR]``"""
    import argparse

    parser = argparse.ArgumentParser(description="Client-fairness figures of finished runs.")
    parser.add_argument("runs", nargs="+", help="run directories (<output-dir>/<run-name>)")
    parser.add_argument("--reference", help="a strategy='local' run, for Delta_m%%")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument(
        "--protocol",
        default=LOCAL_MODEL,
        choices=PROTOCOLS,
        help="local-model (the paper's): each client's model right after its local "
        "training; evaluate: its model after aggregation",
    )
    args = parser.parse_args()
    table = compare_runs(args.runs, args.reference, args.metric, args.protocol)
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    reference = (
        client_scores(args.reference, args.metric, None, args.protocol)["metric"]
        if args.reference
        else None
    )
    for run_dir in args.runs:
        scores = client_scores(run_dir, args.metric, None, args.protocol)
        print(f"\n{Path(run_dir).name}, by rank tier:")
        print(by_rank_tier(scores, reference).to_string(float_format=lambda v: f"{v:.4g}"))
        gaps = rank_gaps(scores)
        if not gaps.empty:
            print("within-group gap to the group's highest rank (mean, 95% interval):")
            print(gaps.to_string(float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
