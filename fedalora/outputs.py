"""The files a run writes under ``<output-dir>/<run-name>/`` (JSON, JSONL, safetensors)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

CONFIG, METRICS, ROUNDS, SUMMARY = "config.json", "metrics.jsonl", "rounds.jsonl", "summary.json"
SHARED_STATE = "shared_state.safetensors"


def client_dir(run_dir: str | Path, partition_id: int) -> Path:
    """Where client ``partition_id`` writes its exported adapter (``<dir>/adapter``)."""
    return Path(run_dir) / "clients" / str(partition_id)


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
