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


def protocol_scores(phase: str, scores: Sequence[float]) -> dict[str, Any]:
    """A round's client scores under one protocol: ``<phase>_mean_accuracy``,
    ``<phase>_worst_accuracy`` (None without scores) and ``<phase>_clients``."""
    prefix = phase.replace("-", "_")
    return {
        f"{prefix}_mean_accuracy": float(np.mean(scores)) if scores else None,
        f"{prefix}_worst_accuracy": float(np.min(scores)) if scores else None,
        f"{prefix}_clients": len(scores),
    }


def final_figures(last_round: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json's figures from the last round's row: ``final_<phase>_mean_accuracy``
    and ``final_<phase>_worst_accuracy`` for both protocols."""
    return {
        f"final_{key}": last_round.get(key)
        for phase in PROTOCOLS
        for key in (
            f"{phase.replace('-', '_')}_mean_accuracy",
            f"{phase.replace('-', '_')}_worst_accuracy",
        )
    }


def progress_line(row: Mapping[str, Any], num_rounds: int | None) -> str:
    """One line for a rounds.jsonl row (the server's log and the console): both
    protocols' mean and worst score, epsilon under DP, failed or rejected replies, bytes
    each way and the round's seconds."""
    parts = [f"round {row['round']}/{num_rounds or '?'}"]
    if row.get("skipped"):
        parts.append("skipped (no usable update)")
    for phase, label in ((LOCAL_MODEL, "local models"), (EVALUATE, "after aggregation")):
        prefix = phase.replace("-", "_")
        mean, worst = row.get(f"{prefix}_mean_accuracy"), row.get(f"{prefix}_worst_accuracy")
        if mean is not None:
            parts.append(f"{label}: mean {mean:.3f}, worst {worst:.3f}")
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
    """Appends per-client and per-round records and writes the final files."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

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

    def client_row(self, row: Mapping[str, Any]) -> None:
        """One (round, client, phase) record to metrics.jsonl."""
        self._append(METRICS, row)

    def round_row(self, row: Mapping[str, Any]) -> None:
        """One per-round server record to rounds.jsonl."""
        self._append(ROUNDS, row)

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
        """summary.json, written last: ``status`` is 'completed' only for a finished run."""
        _write_json_atomic(self.run_dir / SUMMARY, {"status": status, **figures})

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
