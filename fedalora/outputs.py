"""The files a run writes under ``<output-dir>/<run-name>/`` (JSON, JSONL, safetensors)."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from .tracking import Tracker

CONFIG, METRICS, ROUNDS, SUMMARY = "config.json", "metrics.jsonl", "rounds.jsonl", "summary.json"
SHARED_STATE = "shared_state.safetensors"
#: The ServerApp's warnings during the run, one per line (what the console shows).
WARNINGS = "warnings.log"
#: The phases of ``metrics.jsonl`` rows: a client's local training; its local model
#: scored right after that training, before aggregation (the paper's protocol:
#: Fed-ALoRA scores each client's last local model); and its personalised model after
#: aggregation (the shared state it receives plus its own private state).
TRAIN, LOCAL_MODEL, EVALUATE = "train", "local-model", "evaluate"
#: The evaluation protocols, the paper's first.
PROTOCOLS = (LOCAL_MODEL, EVALUATE)


def protocol_scores(phase: str, scores: Sequence[float], metric: str) -> dict[str, Any]:
    """A round's client scores under one protocol, by the metric's name:
    ``<phase>_mean_<metric>``, ``<phase>_worst_<metric>`` (None without scores) and
    ``<phase>_clients``."""
    prefix = phase.replace("-", "_")
    return {
        f"{prefix}_mean_{metric}": float(np.mean(scores)) if scores else None,
        f"{prefix}_worst_{metric}": float(np.min(scores)) if scores else None,
        f"{prefix}_clients": len(scores),
    }


def final_figures(last_round: Mapping[str, Any], metric: str) -> dict[str, Any]:
    """summary.json's figures from the last round's row: ``metric`` (its name) and
    ``final_<phase>_mean_<metric>``, ``final_<phase>_worst_<metric>`` of both protocols."""
    return {
        "metric": metric,
        **{
            f"final_{key}": last_round.get(key)
            for phase in PROTOCOLS
            for key in (
                f"{phase.replace('-', '_')}_mean_{metric}",
                f"{phase.replace('-', '_')}_worst_{metric}",
            )
        },
    }


def progress_line(row: Mapping[str, Any], num_rounds: int | None) -> str:
    """One line for a rounds.jsonl row (the server's log and the console): both
    protocols' mean and worst score, by the metric's name, epsilon under DP, failed or
    rejected replies, bytes each way and the round's seconds."""
    parts = [f"round {row['round']}/{num_rounds or '?'}"]
    if row.get("skipped"):
        parts.append("skipped (no usable update)")
    metric = row.get("metric", "accuracy")
    for phase, label in ((LOCAL_MODEL, "local models"), (EVALUATE, "after aggregation")):
        prefix = phase.replace("-", "_")
        mean, worst = row.get(f"{prefix}_mean_{metric}"), row.get(f"{prefix}_worst_{metric}")
        if mean is not None:
            parts.append(f"{label}: {metric} mean {mean:.3f}, worst {worst:.3f}")
    if row.get("epsilon") is not None:
        parts.append(f"epsilon {row['epsilon']:.2f}")
    lost = {k: row[k] for k in ("failed", "rejected") if row.get(k)}
    parts += [f"{count} {kind}" for kind, count in lost.items()]
    if row.get("bytes_up") or row.get("bytes_down"):
        parts.append(f"up {row['bytes_up'] / 1e6:.2f} MB, down {row['bytes_down'] / 1e6:.2f} MB")
    return " | ".join(parts) + f" | {row.get('seconds', 0.0):.0f} s"


def adapter_dir(run_dir: str | Path, partition_id: int, phase: str) -> Path:
    """Where client ``partition_id`` exports the model that ``phase`` scores in the last
    round: ``clients/<id>/local-model`` (its model right after its last local training)
    or ``clients/<id>/adapter`` (its personalised model after the last aggregation)."""
    name = {LOCAL_MODEL: "local-model", EVALUATE: "adapter"}[phase]
    return Path(run_dir) / "clients" / str(partition_id) / name


class RunRecorder:
    """Appends per-client and per-round records and writes the final files; with a
    tracker attached, also hands them to it (run-config ``tracker``)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracker: Tracker | None = None
        self._round_clients: list[Mapping[str, Any]] = []

    def attach(self, tracker: Tracker | None) -> None:
        """Also log the config, the rounds and the summary to ``tracker`` (None: none);
        ``finish`` closes it."""
        self.tracker = tracker

    def start(self, resume_after: int = 0) -> None:
        """Begin a run's records: afresh, or, when resuming after round
        ``resume_after``, keeping the rows up to that round (and dropping any that a
        killed run wrote for later rounds)."""
        (self.run_dir / SUMMARY).unlink(missing_ok=True)
        for name in (METRICS, ROUNDS):
            path = self.run_dir / name
            kept = (
                [row for row in read_jsonl(path) if row["round"] <= resume_after]
                if resume_after and path.exists()
                else []
            )
            path.unlink(missing_ok=True)
            for row in kept:
                self._append(name, row)

    def write_config(self, config: Mapping[str, Any]) -> None:
        _write_json_atomic(self.run_dir / CONFIG, config)
        if self.tracker:
            self.tracker.log_config(config)

    def client_row(self, row: Mapping[str, Any]) -> None:
        """One (round, client, phase) record to metrics.jsonl."""
        self._append(METRICS, row)
        if self.tracker:
            self._round_clients.append(row)

    def round_row(self, row: Mapping[str, Any]) -> None:
        """One per-round server record to rounds.jsonl (and, with that round's client
        records, to the tracker)."""
        self._append(ROUNDS, row)
        if self.tracker:
            rows = [r for r in self._round_clients if r["round"] == row["round"]]
            self._round_clients = []
            self.tracker.log_round(row, rows)

    def save_shared(self, arrays: Mapping[str, np.ndarray]) -> None:
        """The shared state (never a client's private factors) as safetensors."""
        tmp = self.run_dir / f".{SHARED_STATE}.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        tmp.replace(self.run_dir / SHARED_STATE)

    @contextlib.contextmanager
    def warnings_to_file(self, logger: logging.Logger) -> Iterator[None]:
        """While open, ``logger``'s warnings (not its errors) also go to warnings.log."""
        handler = logging.FileHandler(self.run_dir / WARNINGS, mode="w", encoding="utf-8")
        handler.addFilter(lambda record: record.levelno == logging.WARNING)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            handler.close()

    def finish(self, status: str, **figures: Any) -> None:
        """summary.json, written last: ``status`` is 'completed' only for a finished run;
        then the tracker's summary, and the tracker is closed."""
        summary = {"status": status, **figures}
        try:
            _write_json_atomic(self.run_dir / SUMMARY, summary)
        finally:
            tracker, self.tracker = self.tracker, None
            if tracker:
                tracker.finish(summary)

    def _append(self, name: str, row: Mapping[str, Any]) -> None:
        with (self.run_dir / name).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_json_atomic(path: Path, obj: Any) -> None:
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8"
    ) as handle:
        json.dump(obj, handle, indent=2)
    Path(handle.name).replace(path)
