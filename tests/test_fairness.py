"""Fairness metrics against hand-computed values, and over a run directory's files."""

import json

import numpy as np
import pandas as pd
import pytest

from fedalora import fairness
from fedalora.outputs import RunRecorder


def test_metrics_by_hand():
    m = [0.5, 1.0, 1.0, 0.5]
    assert fairness.jain_index(m) == pytest.approx(9 / (4 * 2.5))  # (3)^2 / (4 * 2.5)
    assert fairness.jain_index([0.7] * 5) == pytest.approx(1.0)
    # Pairs differ by 0.5 in 8 of 16 ordered pairs: 4 / (2 * 16 * 0.75).
    assert fairness.gini(m) == pytest.approx(4 / 24)
    assert fairness.gini([0.3] * 4) == 0
    assert fairness.worst_fraction_mean([0.9, 0.1, 0.5], 0.1) == pytest.approx(0.1)
    assert fairness.worst_fraction_mean(list(range(1, 21)), 0.1) == pytest.approx(1.5)
    values = pd.Series([0.5, 0.9], index=[0, 1])
    reference = pd.Series([1.0, 0.6], index=[0, 1])  # -> +50% and -50%
    assert fairness.delta_m(values, reference) == pytest.approx(0.0)
    assert fairness.delta_m(pd.Series([0.5], index=[0]), reference) == pytest.approx(50.0)
    zero_ref = pd.Series([0.0, 0.6], index=[0, 1])  # client 0's ratio is undefined
    assert fairness.delta_m(values, zero_ref) == pytest.approx(-50.0)
    assert fairness.summarise(values, zero_ref)["delta_m_clients"] == 1
    undefined = fairness.summarise(values, pd.Series([0.0, 0.0], index=[0, 1]))
    assert np.isnan(undefined["delta_m_pct"]) and undefined["delta_m_clients"] == 0
    with pytest.raises(ValueError, match="every reference"):
        fairness.delta_m(values, pd.Series([0.0, 0.0], index=[0, 1]))
    with pytest.raises(ValueError, match="no reference"):
        fairness.delta_m(pd.Series([0.5], index=[7]), reference)
    x, y = fairness.lorenz_curve([3.0, 1.0])
    np.testing.assert_allclose(x, [0, 0.5, 1])
    np.testing.assert_allclose(y, [0, 0.25, 1])
    figures = fairness.summarise(pd.Series(m))
    assert figures["std"] == pytest.approx(0.25) and figures["worst"] == 0.5
    assert figures["mean"] == pytest.approx(0.75) and figures["clients"] == 4


def _fake_run(path, strategy, accuracies, ranks=(8, 8, 2, 2), per_group=1):
    """Local-model scores ``accuracies``; after aggregation each is 0.1 lower."""
    recorder = RunRecorder(path)
    recorder.write_config(
        {
            "strategy": strategy,
            "clients-per-group": per_group,
            "clients": [{"client": c, "rank": r, "num_examples": 10} for c, r in enumerate(ranks)],
        }
    )
    phases = (("train", 100, 50, 0.0), ("local-model", 0, 0, 0.0), ("evaluate", 0, 50, 0.1))
    for server_round, scores in enumerate(accuracies, start=1):
        for client, (acc, rank) in enumerate(zip(scores, ranks, strict=True)):
            for phase, up, down, lower in phases:
                recorder.client_row(
                    {
                        "round": server_round,
                        "client": client,
                        "rank": rank,
                        "phase": phase,
                        "num_examples": 10,
                        "loss": 1.0,
                        "accuracy": acc - lower,
                        "bytes_up": up,
                        "bytes_down": down,
                        "seconds": 0.1,
                    }
                )
    recorder.finish("completed", wall_seconds=12.0)
    return path


def test_run_directory_functions(tmp_path):
    fed = _fake_run(tmp_path / "fed", "fedalora-hetero", [[0.5] * 4, [0.8, 0.8, 0.4, 0.4]])
    local = _fake_run(tmp_path / "local", "local", [[0.5] * 4, [0.4, 0.4, 0.8, 0.8]])
    scores = fairness.client_scores(fed)  # the paper's protocol: the local models
    assert list(scores["metric"]) == [0.8, 0.8, 0.4, 0.4] and list(scores["rank"]) == [8, 8, 2, 2]
    after = fairness.client_scores(fed, protocol="evaluate")
    np.testing.assert_allclose(after["metric"], [0.7, 0.7, 0.3, 0.3])
    assert list(scores["group"]) == [0, 1, 2, 3]  # one client per group
    assert fairness.rank_gaps(scores).empty  # no group mixes ranks: no paired gap
    tiers = fairness.by_rank_tier(scores, fairness.client_scores(local)["metric"])
    assert tiers.loc[8, "mean"] == pytest.approx(0.8) and tiers.loc[2, "mean"] == 0.4
    assert tiers.loc[2, "delta_m_pct"] == pytest.approx(50.0)  # low ranks left behind
    assert tiers.loc[8, "delta_m_pct"] == pytest.approx(-100.0)
    rounds = fairness.over_rounds(fed)
    assert list(rounds.index) == [1, 2] and rounds.loc[1, "jain"] == pytest.approx(1.0)
    table = fairness.compare_runs([fed, local], reference=local)
    assert table.loc["local", "delta_m_pct"] == 0.0
    assert table.loc["fed", "delta_m_pct"] == pytest.approx((-100 - 100 + 50 + 50) / 4)
    assert table.loc["fed", "bytes_up_per_client_round"] == 100
    assert table.loc["fed", "bytes_down_per_client_round"] == 50  # the training phase
    assert fairness.communication(fed, phase="evaluate") == {
        "bytes_up_per_client_round": 0.0,
        "bytes_down_per_client_round": 50.0,
    }
    assert fairness.primary_metric(fed) == "accuracy"
    assert json.loads((fed / "summary.json").read_text())["status"] == "completed"


def test_instruction_runs_are_scored_by_rouge1(tmp_path):
    recorder = RunRecorder(tmp_path / "inst")
    recorder.client_row(
        {
            "round": 1,
            "client": 0,
            "rank": 8,
            "phase": "evaluate",
            "accuracy": 0.3,
            "rouge1": 0.6,
            "exact_match": 0.5,
        }
    )
    assert fairness.primary_metric(tmp_path / "inst") == "rouge1"


def test_rank_gaps_are_paired_within_groups_with_their_interval(tmp_path):
    """Groups of 2 clients (ranks 8 and 2) share data: the rank-2 client's gap to the
    rank-8 client of its own group, averaged over the 3 groups, with a t interval."""
    ranks = (8, 2) * 3
    run = _fake_run(
        tmp_path / "paired",
        "fedalora-hetero",
        [[0.9, 0.7, 0.6, 0.5, 0.8, 0.5]],
        ranks=ranks,
        per_group=2,
    )
    scores = fairness.client_scores(run)
    assert list(scores["group"]) == [0, 0, 1, 1, 2, 2]
    gaps = fairness.rank_gaps(scores)
    # gaps -0.2, -0.1, -0.3: mean -0.2, sd 0.1, t(0.975, 2) = 4.302653
    half = 4.302653 * 0.1 / np.sqrt(3)
    assert list(gaps.index) == [2] and gaps.loc[2, "groups"] == 3
    assert gaps.loc[2, "mean"] == pytest.approx(-0.2)
    assert gaps.loc[2, "low"] == pytest.approx(-0.2 - half, rel=1e-5)
    assert gaps.loc[2, "high"] == pytest.approx(-0.2 + half, rel=1e-5)
