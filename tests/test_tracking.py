"""Experiment trackers (run-config ``tracker``): a fake run through RunRecorder, read
back with each library's own reader; a missing library's headline; a tiny real run
into TensorBoard."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedalora.errors import ConfigError
from fedalora.outputs import RunRecorder, read_jsonl
from fedalora.tracking import MLflowTracker, TensorBoardTracker, WandbTracker, open_tracker
from server.in_process import run_in_process

APP = Path(__file__).resolve().parents[1]
RANKS = {0: 8, 1: 4, 2: 8}  # client -> rank
PHASE_OFFSET = {"train": 0.0, "local-model": 0.01, "evaluate": 0.02}
LAYER = "encoder.layer.0.attention.self.query"
CONFIG = {
    "strategy": "fedalora-hetero",
    "lr": 0.002,
    "dora": False,
    "run-name": "fake",
    "clients": [{"client": c, "rank": r, "num_examples": 10 + c} for c, r in RANKS.items()],
    "adapted_layers": {LAYER: [384, 384]},
}
#: tag -> {round: value}, worked out by hand from the rows below.
EXPECTED = {
    "round/bytes_up": {1: 1000, 2: 2000},
    "round/epsilon": {1: 0.75, 2: 1.5},
    "round/rejected": {1: 0, 2: 1},
    "round/local_model_mean_accuracy": {1: 0.4, 2: 0.5},
    "round/evaluate_mean_accuracy": {2: 0.55},  # None in round 1: not logged
    "clients/1/train/loss": {1: 2.1, 2: 1.1},
    "clients/2/local-model/accuracy": {1: 0.36, 2: 0.61},
    "clients/0/evaluate/accuracy": {2: 0.52},
    "clients/1/evaluate/rouge1": {2: 0.3},
    "rank-8/train/accuracy": {1: 0.30, 2: 0.55},  # clients 0 and 2
    "rank-8/evaluate/accuracy": {2: 0.52},  # client 2 is not evaluated
    "rank-4/local-model/num_examples": {1: 11, 2: 11},
    "summary/final_local_model_mean_accuracy": {2: 0.5},
    "summary/wall_seconds": {2: 7.5},
}
NOT_LOGGED = ("round/round", "clients/0/train/rank", "clients/0/train/round")
TINY = (
    "num-hidden-layers=1 local-steps=1 batch-size=4 max-length=24 ranks='8,4,2' "
    "num-server-rounds=2 test-fraction=0.05 export-adapters=false checkpoint=false"
)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the trackers or their libraries set in the environment is undone."""
    names = {
        *(
            key
            for cls in (TensorBoardTracker, MLflowTracker, WandbTracker)
            for key in cls.offline_env
        ),
        *("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_SERVICE"),
    }
    for name in names:
        monkeypatch.setenv(name, "")  # recorded, so that teardown restores it
        monkeypatch.delenv(name)


def _client_row(server_round: int, client: int, phase: str) -> dict[str, Any]:
    row = {
        "round": server_round,
        "client": client,
        "rank": RANKS[client],
        "phase": phase,
        "num_examples": 10 + client,
        "loss": 2.0 / server_round + client / 10,
        "accuracy": 0.25 * server_round + 0.05 * client + PHASE_OFFSET[phase],
        "bytes_up": 100 * client if phase == "train" else 0,
        "seconds": 0.5,
    }
    return row | ({"rouge1": 0.3} if phase == "evaluate" and client == 1 else {})


def _round_row(server_round: int) -> dict[str, Any]:
    return {
        "round": server_round,
        "attempts": 1,
        "skipped": False,
        "failed": 0,
        "rejected": server_round - 1,
        "local_model_mean_accuracy": 0.1 * server_round + 0.3,
        "local_model_worst_accuracy": 0.1 * server_round,
        "local_model_clients": 3,
        "evaluate_mean_accuracy": None if server_round == 1 else 0.55,
        "bytes_up": 1000 * server_round,
        "bytes_down": 3000 * server_round,
        "epsilon": 0.75 * server_round,
        "seconds": 2.5 * server_round,
    }


def _fake_run(run_dir: Path, tracker: str, status: str = "completed") -> None:
    """Two rounds: every client trains and scores its local model; in round 2 clients
    0 and 1 are evaluated after aggregation."""
    recorder = RunRecorder(run_dir)
    recorder.attach(open_tracker(tracker, run_dir, "fake"))
    recorder.start()
    recorder.write_config(CONFIG)
    for server_round in (1, 2):
        for client in RANKS:
            recorder.client_row(_client_row(server_round, client, "train"))
            recorder.client_row(_client_row(server_round, client, "local-model"))
        if server_round == 2:
            for client in (0, 1):
                recorder.client_row(_client_row(server_round, client, "evaluate"))
        recorder.round_row(_round_row(server_round))
    recorder.finish(
        status, rounds=2, final_local_model_mean_accuracy=0.5, stopped_early=None, wall_seconds=7.5
    )


def _assert_figures(series: dict[str, dict[int, float]], summary: bool = True) -> None:
    """``series`` holds EXPECTED's figures (without the summary's: ``summary=False``)."""
    for tag, expected in EXPECTED.items():
        if summary or not tag.startswith("summary/"):
            assert series.get(tag) == pytest.approx(expected), tag
    assert not set(NOT_LOGGED) & set(series)


# ------------------------------------------------------------------ TensorBoard
def _tensorboard(run_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, list[str]]]:
    """The event files' scalars (tag -> {step: value}) and texts (tag -> texts)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {
        tag: {event.step: event.value for event in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
    }
    texts = {
        tag: [event.tensor_proto.string_val[0].decode() for event in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
    }
    return scalars, texts


def test_tensorboard_event_files_hold_the_rounds_and_the_summary(tmp_path):
    _fake_run(tmp_path, "tensorboard")
    scalars, texts = _tensorboard(tmp_path)
    _assert_figures(scalars)
    (config,) = texts["config/text_summary"]
    assert "| lr | 0.002 |" in config and f"| adapted_layers/{LAYER} | [384, 384] |" in config
    (summary,) = texts["summary/text_summary"]
    assert "| status | completed |" in summary and "| rounds | 2 |" in summary


# ----------------------------------------------------------------------- MLflow
def _mlflow_run(tracking_uri: str) -> tuple[Any, Any]:
    """The client and the one run of experiment 'fedalora' in that store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("fedalora")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_mlflow_file_store_holds_params_metric_histories_and_status(tmp_path):
    _fake_run(tmp_path, "mlflow")
    client, run = _mlflow_run((tmp_path / "mlruns").as_uri())
    assert run.info.run_name == "fake" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["lr"] == "0.002" and params["dora"] == "False"
    assert params["clients/1/rank"] == "4" and params["clients/2/num_examples"] == "12"
    assert params[f"adapted_layers/{LAYER}"] == "[384, 384]"
    histories = {
        tag: {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
        for tag in run.data.metrics
    }
    _assert_figures(histories)
    assert run.data.tags["summary/status"] == "completed"


def test_mlflow_follows_mlflow_tracking_uri_and_marks_a_failed_run(tmp_path, monkeypatch):
    elsewhere = (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    _fake_run(tmp_path / "run", "mlflow", status="failed")
    assert not (tmp_path / "run" / "mlruns").exists()
    _, run = _mlflow_run(elsewhere)
    assert run.info.status == "FAILED" and run.data.tags["summary/status"] == "failed"


# --------------------------------------------------------------- Weights & Biases
def _wandb_records(run_dir: Path) -> Iterator[Any]:
    """The records of the offline run's ``.wandb`` file as wandb's own protobuf
    messages. wandb (>= 0.2x) no longer ships a Python reader for the file's framing,
    LevelDB's log format: a 7-byte header, then 32 KiB blocks of chunks, each with a
    7-byte header (CRC, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, offset, record = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        length, kind = int.from_bytes(data[offset + 4 : offset + 6], "little"), data[offset + 6]
        record += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            message = wandb_internal_pb2.Record()
            message.ParseFromString(record)
            yield message
            record = b""


def _items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_wandb_offline_run_holds_config_history_and_summary(tmp_path):
    _fake_run(tmp_path, "wandb")
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: dict[str, dict[int, float]] = {}
    names = []
    for record in _wandb_records(tmp_path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            names.append((record.run.display_name, record.run.project))
        elif kind == "config":
            config |= _items(record.config.update)
        elif kind == "summary":
            summary |= _items(record.summary.update)
        elif kind == "history":
            for key, value in _items(record.history.item).items():
                history.setdefault(key, {})[record.history.step.num] = value
    assert names == [("fake", "fedalora")]
    assert config["lr"] == 0.002 and config["clients/1/rank"] == 4
    assert config[f"adapted_layers/{LAYER}"] == "[384, 384]"
    _assert_figures(history, summary=False)
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert summary["final_local_model_mean_accuracy"] == 0.5 and summary["wall_seconds"] == 7.5
    assert "stopped_early" not in summary


# ----------------------------------------------------------------- missing library
@pytest.mark.parametrize(
    ("tracker", "module", "package"),
    [
        ("tensorboard", "tensorboard", "tensorboard"),
        ("mlflow", "mlflow", "mlflow-skinny"),
        ("wandb", "wandb", "wandb"),
    ],
)
def test_a_tracker_whose_library_is_missing_names_the_pip_command(
    tmp_path, monkeypatch, tracker, module, package
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when not installed
    with pytest.raises(ConfigError) as error:
        open_tracker(tracker, tmp_path, "x")
    assert error.value.key == "tracker"
    assert f"pip install 'fedalora[{tracker}]'" in str(error.value)
    assert f"pip install {package}" in str(error.value)


def test_a_missing_tracker_library_is_the_runs_headline_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError):
        run_in_process(
            APP, "no-mlflow", num_supernodes=3, output_dir=tmp_path, run_config="tracker='mlflow'"
        )
    summary = json.loads((tmp_path / "no-mlflow" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error_key"] == "tracker"
    assert "pip install 'fedalora[mlflow]'" in summary["error"]
    assert not (tmp_path / "no-mlflow" / "metrics.jsonl").exists()


# ------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_a_tiny_run_logs_its_rounds_to_tensorboard(tmp_path):
    run_dir = run_in_process(
        APP, "tb", num_supernodes=3, output_dir=tmp_path, run_config=f"{TINY} tracker='tensorboard'"
    )
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    scalars, texts = _tensorboard(run_dir)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert [row["round"] for row in rounds] == [1, 2]
    figures = 0
    for row in rounds:
        for key, value in row.items():
            if isinstance(value, int | float) and key != "round":
                expected = pytest.approx(float(value), rel=1e-6)
                assert scalars[f"round/{key}"][row["round"]] == expected, key
                figures += 1
    assert figures >= 2 * 10 and "round/evaluate_mean_accuracy" in scalars
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        for key, value in row.items():
            if isinstance(value, int | float) and key not in ("round", "client", "rank"):
                tag = f"clients/{row['client']}/{row['phase']}/{key}"
                assert scalars[tag][row["round"]] == pytest.approx(float(value), rel=1e-6), tag
    assert {"rank-8/train/loss", "rank-4/local-model/accuracy", "rank-2/evaluate/loss"} <= set(
        scalars
    )
    (summary,) = texts["summary/text_summary"]
    assert "| status | completed |" in summary
