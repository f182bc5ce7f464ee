"""The benchmark grid: what it plans, and a smoke run of the instruction track that
produces the results table (federated run, local and centralised references)."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from grid import plan


def test_plan_drops_homogeneous_only_strategies_from_heterogeneous_ranks():
    runs = plan(["homogeneous", "heterogeneous"], ["fedit", "fedalora-hetero", "local"])
    assert runs == [
        ("homogeneous", "fedit"),
        ("homogeneous", "fedalora-hetero"),
        ("homogeneous", "local"),
        ("homogeneous", "centralised"),
        ("heterogeneous", "fedalora-hetero"),
        ("heterogeneous", "local"),
        ("heterogeneous", "centralised"),
    ]
    default = plan(["heterogeneous"], None)
    assert ("heterogeneous", "fedsa-lora") not in default and len(default) == 8


@pytest.mark.slow
def test_instruction_smoke_grid_writes_the_table(tmp_path):
    out = tmp_path / "grid"
    subprocess.run(
        [
            sys.executable,
            "benchmarks/grid.py",
            "--track",
            "instruction",
            "--preset",
            "smoke",
            "--settings",
            "heterogeneous",
            "--strategies",
            "fedalora-hetero",
            "--output-dir",
            str(out),
        ],
        cwd=Path(__file__).parents[1],
        check=True,
        timeout=900,
    )
    table = pd.read_csv(out / "table.csv").set_index("strategy")
    assert list(table.index) == ["fedalora-hetero", "local", "centralised"]
    local = pd.read_json(out / "heterogeneous-local" / "metrics.jsonl", lines=True)
    if (local.loc[local["phase"] == "evaluate", "rouge1"] == 0).all():  # a 2-layer model
        assert table["delta_m_pct"].isna().all()  # undefined against all-zero references
    else:
        assert table.loc["local", "delta_m_pct"] == 0.0
    assert table["mean"].between(0, 1).all() and (table["worst"] <= table["mean"]).all()
    assert table.loc["fedalora-hetero", "bytes_up_per_client_round"] > 0
    assert table.loc["centralised", "bytes_up_per_client_round"] == 0
    assert (table["wall_seconds"] > 0).all()
    assert not (out / "heterogeneous-fedalora-hetero" / "clients").exists()  # export off
    text = (out / "table.md").read_text()
    assert "Command: `python benchmarks/grid.py --track instruction" in text
    assert text.count("| heterogeneous |") == 3
