"""End to end: real `flwr run` Ray simulations of 3 clients over 2 rounds on a tiny real
model (packaged MiniLM cut to 2 layers), checked through the files they write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedalora.adapters import load_peft_adapter
from fedalora.models import load_base_model
from fedalora.outputs import read_jsonl
from fedalora.simulate import SimulationFailed, run_simulation

APP = Path(__file__).resolve().parents[1]
TINY = ("num-hidden-layers=2 local-steps=3 batch-size=8 max-length=32 dataset='bbc-news' "
        "num-server-rounds=2 lr=0.001 intermediate-rank=4")
pytestmark = pytest.mark.slow


def _simulate(tmp: Path, name: str, extra: str) -> Path:
    return run_simulation(APP, name, num_supernodes=3, run_config=f"{TINY} {extra}",
                          output_dir=tmp / "outputs", flwr_home=tmp / "flwr-home",
                          num_cpus=1, timeout=600, log_path=tmp / f"{name}.log")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sim")
    hetero = "strategy='fedalora-hetero' ranks='8,4,2'"
    return {"hetero": _simulate(tmp, "hetero", hetero),
            "hetero-again": _simulate(tmp, "hetero-again", hetero),
            "homo": _simulate(tmp, "homo", "strategy='fedalora' ranks='4'")}


def _layers(run_dir: Path) -> dict[str, list[int]]:
    return json.loads((run_dir / "config.json").read_text())["adapted_layers"]


def test_output_files_follow_the_contract(runs):
    for run_dir in runs.values():
        config = json.loads((run_dir / "config.json").read_text())
        assert [c["client"] for c in config["clients"]] == [0, 1, 2]
        rows = read_jsonl(run_dir / "metrics.jsonl")
        assert len(rows) == 2 * 3 * 2  # rounds x clients x phases
        for row in rows:
            assert {"round", "client", "rank", "phase", "num_examples", "loss", "accuracy",
                    "bytes_up", "bytes_down", "seconds"} <= row.keys()
            assert np.isfinite(row["loss"]) and 0 <= row["accuracy"] <= 1
        rounds = read_jsonl(run_dir / "rounds.jsonl")
        assert [r["round"] for r in rounds] == [1, 2]
        assert {"mean_accuracy", "worst_accuracy", "bytes_up", "bytes_down",
                "aggregate_seconds"} <= rounds[0].keys()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["final_mean_accuracy"] == rounds[-1]["mean_accuracy"]
        for client in range(3):
            assert (run_dir / "clients" / str(client) / "adapter" / "adapter_config.json").exists()


def test_ranks_and_bytes_match_the_rule(runs):
    d_m = 4
    for name, ranks in [("hetero", [8, 4, 2]), ("homo", [4, 4, 4])]:
        layers = _layers(runs[name])
        config = json.loads((runs[name] / "config.json").read_text())
        assert [c["rank"] for c in config["clients"]] == ranks
        for row in read_jsonl(runs[name] / "metrics.jsonl"):
            r = row["rank"]
            if name == "hetero":
                up = sum(d_out * r + r * d_m for d_out, _ in layers.values()) * 4
                down = sum(d_out * d_m for d_out, _ in layers.values()) * 4
            else:
                up = down = sum(d_out * r for d_out, _ in layers.values()) * 4
            assert row["bytes_down"] == down
            assert row["bytes_up"] == (up if row["phase"] == "train" else 0)
        rounds = read_jsonl(runs[name] / "rounds.jsonl")
        train_up = [sum(r["bytes_up"] for r in read_jsonl(runs[name] / "metrics.jsonl")
                        if r["round"] == k and r["phase"] == "train") for k in (1, 2)]
        assert [r["bytes_up"] for r in rounds] == train_up


def test_server_checkpoint_holds_only_shared_state(runs):
    for name, suffix in [("hetero", ".B0"), ("homo", ".lora_B")]:
        shared = load_file(str(runs[name] / "shared_state.safetensors"))
        assert set(shared) == {f"{m}{suffix}" for m in _layers(runs[name])}
        assert any(np.abs(v).max() > 0 for v in shared.values())  # training reached the server
    # No client's private A appears in the server's checkpoint.
    base = load_base_model("minilm", 5, num_hidden_layers=2)
    shared = load_file(str(runs["hetero"] / "shared_state.safetensors"))
    for client in range(3):
        path = runs["hetero"] / "clients" / str(client) / "adapter"
        adapter = load_peft_adapter(base.model, path)
        for key, value in adapter.state_dict().items():
            if "lora_A" in key:
                a = value.numpy()
                assert not any(v.shape == a.shape and np.allclose(v, a) for v in shared.values())


def test_logs_never_name_a_private_tensor(runs):
    for name, private in [("hetero", (".A", ".M")), ("homo", (".lora_A",))]:
        log = (runs[name].parent.parent / f"{name}.log").read_text()
        assert "round 2/2" in log  # the log is the run's own output
        for module in _layers(runs[name]):
            assert not any(f"{module}{suffix}" in log for suffix in private)


def test_same_seed_gives_the_same_run(runs):
    first = load_file(str(runs["hetero"] / "shared_state.safetensors"))
    second = load_file(str(runs["hetero-again"] / "shared_state.safetensors"))
    assert all(np.array_equal(first[k], second[k]) for k in first)
    strip = [{k: v for k, v in row.items() if k != "seconds"}
             for row in read_jsonl(runs["hetero"] / "metrics.jsonl")]
    again = [{k: v for k, v in row.items() if k != "seconds"}
             for row in read_jsonl(runs["hetero-again"] / "metrics.jsonl")]
    key = lambda row: (row["round"], row["phase"], row["client"])  # noqa: E731
    assert sorted(strip, key=key) == sorted(again, key=key)


@pytest.mark.parametrize("name, extra, expected", [
    ("rank-too-big", "ranks='8,4,999'", ["'ranks'", "<= 384"]),
    ("malformed-ranks", "ranks='8,x'", ["'ranks'", "comma-separated integers"]),
])
def test_bad_config_fails_before_training_and_is_not_completed(tmp_path, name, extra, expected):
    with pytest.raises(SimulationFailed) as info:
        _simulate(tmp_path, name, f"strategy='fedalora-hetero' {extra}")
    assert all(text in str(info.value) for text in expected)
    summary = json.loads((tmp_path / "outputs" / name / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert not (tmp_path / "outputs" / name / "metrics.jsonl").exists()
