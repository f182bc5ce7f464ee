"""The benchmark grid: what it plans, and smoke runs that produce its tables (several
seeds with intervals in one process; the instruction track on Ray)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from grid import CENTRALISED, PRESETS, Grid, Run, plan

from fedalora.config import FedConfig

ROOT = Path(__file__).parents[1]


def test_plan_keeps_the_methods_each_setting_can_take_with_every_seed():
    preset = PRESETS[("classification", "default")]
    runs = plan(preset, ["homogeneous", "heterogeneous"], ["fedit", "fedalora-hetero"], [1, 2])
    assert runs == [
        Run(setting, strategy, seed)
        for setting, strategies in (
            ("homogeneous", ["fedit", "fedalora-hetero", "local", "centralised"]),
            ("heterogeneous", ["fedalora-hetero", "local", "centralised"]),
        )
        for strategy in strategies
        for seed in (1, 2)
    ]
    assert {r.strategy for r in plan(preset, ["heterogeneous"], None, [1])} == {
        "fedalora-hetero",
        "zeropad",
        "hetlora",
        "ffa-lora",
        "flexlora",
        "flora",
        "local",
        "centralised",
    }


@pytest.mark.parametrize("key", sorted(PRESETS))
def test_every_planned_run_of_every_preset_is_a_valid_configuration(key, tmp_path):
    """What each run would be handed passes the one validation, before any run starts."""
    preset = PRESETS[key]
    grid = Grid(preset, {}, tmp_path, "in-process")
    for run in plan(preset, list(preset.settings), None, [42]):
        strategy = preset.method(run.strategy)[0]
        if strategy != CENTRALISED:
            FedConfig.from_run_config({**grid.run_config(run), "strategy": strategy})


@pytest.mark.parametrize("track", ["classification", "instruction"])
def test_the_methods_presets_run_the_founding_texts_methods_beside_fed_alora(track):
    preset = PRESETS[(track, "methods")]
    rows = {run.strategy for run in plan(preset, list(preset.settings), None, [42])}
    assert {"fedalora-hetero", "lori-d", "lori-s", "masa"} <= rows
    assert preset.method("lori-s") == ("lori", {"lori-sparsity": 0.9})
    if track == "classification":
        assert {"fedalora", "fedalora-dora", "fedalora-lora-plus"} <= rows


def _grid(tmp_path, *arguments):
    out = tmp_path / "grid"
    subprocess.run(
        [sys.executable, "benchmarks/grid.py", *arguments, "--output-dir", str(out)],
        cwd=ROOT,
        check=True,
        timeout=900,
    )
    return out


@pytest.mark.slow
def test_classification_smoke_grid_reports_intervals_over_seeds_in_process(tmp_path):
    out = _grid(tmp_path, "--preset", "smoke", "--mode", "in-process")
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(set(runs["seed"])) == [42, 43] and len(runs) == 4 * 2
    table = pd.read_csv(out / "table.csv").set_index("strategy")
    assert list(table.index) == ["fedalora-hetero", "zeropad", "local", "centralised"]
    assert (table["seeds"] == 2).all()
    for strategy, row in table.iterrows():  # the interval is around the mean of the seeds
        seeds = runs.loc[runs["strategy"] == strategy, "mean"]
        assert row["mean"] == pytest.approx(seeds.mean())
        assert row["mean_low"] <= row["mean"] <= row["mean_high"]
    zeropad = runs[runs["strategy"] == "zeropad"].set_index("seed")["mean"]
    fed = runs[runs["strategy"] == "fedalora-hetero"].set_index("seed")["mean"]
    assert table.loc["zeropad", "gain"] == pytest.approx((zeropad - fed).mean())
    assert table.loc["local", "delta_m_pct"] == 0.0  # each seed against its own local run
    text = (out / "table.md").read_text()
    assert "mean over 2 seeds ± the half-width of its 95% Student-t interval" in text
    assert "under the `local-model` protocol" in text
    assert "heterogeneous: zeropad vs fedalora-hetero, mean:" in text
    assert "the clients on 1 node(s)" in text  # cohorts by default
    config = json.loads((out / "heterogeneous-zeropad-s42" / "config.json").read_text())
    assert config["num-clients"] == len(config["clients"]) > 1


@pytest.mark.slow
def test_instruction_smoke_grid_writes_the_table(tmp_path):
    out = _grid(tmp_path, "--track", "instruction", "--preset", "smoke", "--mode", "in-process")
    table = pd.read_csv(out / "table.csv").set_index("strategy")
    assert list(table.index) == ["fedalora-hetero", "local", "centralised"]
    runs = pd.read_csv(out / "runs.csv")
    local = pd.read_json(out / "heterogeneous-local-s42" / "metrics.jsonl", lines=True)
    if (local.loc[local["phase"] == "local-model", "rouge1"] == 0).all():  # a 2-layer model
        assert runs["delta_m_pct"].isna().all()  # undefined against all-zero references
    else:
        assert table.loc["local", "delta_m_pct"] == 0.0
    assert table["mean"].between(0, 1).all() and (table["worst"] <= table["mean"]).all()
    assert table.loc["fedalora-hetero", "bytes_up_per_client_round"] > 0
    assert table.loc["centralised", "bytes_up_per_client_round"] == 0
    assert (table["wall_seconds"] > 0).all()
    assert not (out / "heterogeneous-fedalora-hetero-s42" / "clients").exists()  # export off
    text = (out / "table.md").read_text()
    assert "Command: `python benchmarks/grid.py --track instruction" in text
    assert text.count("| heterogeneous |") == 3
