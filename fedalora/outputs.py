"""The files a run writes under ``<output-dir>/<run-name>/`` (JSON, JSONL, safetensors)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from safetensors.numpy import save_file

from .tracking import Tracker

CONFIG, METRICS, ROUNDS, SUMMARY = "config.json", "metrics.jsonl", "rounds.jsonl", "summary.json"
SHARED_STATE = "shared_state.safetensors"
#: The ServerApp's warnings during the run, one per line (what the console shows).
WARNINGS = "warnings.log"
#: summary.json's status while a run's server is at work, and for a run whose server
#: stopped before it finished (killed, Ctrl-C, SIGTERM): see ``run_status``.
RUNNING, INTERRUPTED = "running", "interrupted"
#: How the line that separates a resumed attempt's warnings from the earlier ones starts.
RESUMED_MARK = "--- resumed"
#: The fields of an earlier attempt that a resumed attempt's summary.json keeps.
ATTEMPT_FIELDS = ("started", "rounds", "resumed_after_round", "error")
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


def run_status(run_dir: str | Path) -> str | None:
    """The status of the run in ``run_dir``: summary.json's ``completed``, ``failed`` or
    ``interrupted``, or None without one. A summary left ``running`` is ``interrupted``
    once its server's process is gone (kill -9, a lost machine); it stays ``running``
    while that process lives, or when it ran on another host (which this cannot check)."""
    path = Path(run_dir) / SUMMARY
    return _status(json.loads(path.read_text(encoding="utf-8"))) if path.exists() else None


def _status(summary: Mapping[str, Any]) -> str:
    """``run_status`` of a summary.json's content."""
    status = str(summary["status"])
    if status == RUNNING and summary.get("host") == socket.gethostname():
        started = datetime.fromisoformat(summary["started"]).timestamp()
        return RUNNING if _alive(int(summary["pid"]), started) else INTERRUPTED
    return status


def _alive(pid: int, started: float) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``started`` (a process
    created later reuses the pid; 1 s of slack for the boot time's whole seconds)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= started + 1
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: alive
        return True


class RunRecorder:
    """Appends per-client and per-round records and writes the final files; with a
    tracker attached, also hands them to it (run-config ``tracker``).

    summary.json says ``running`` from ``begin`` on and is replaced by ``finish``, so a
    run killed on the way leaves a directory that ``run_status`` calls interrupted."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracker: Tracker | None = None
        #: This attempt's own fields of summary.json (``begin``), in every summary it writes.
        self.attempt: dict[str, Any] = {}
        self.resuming = False
        self._round_clients: list[Mapping[str, Any]] = []

    def attach(self, tracker: Tracker | None) -> None:
        """Also log the config, the rounds and the summary to ``tracker`` (None: none);
        ``finish`` closes it."""
        self.tracker = tracker

    def begin(self, resume: bool = False) -> None:
        """This attempt starts: summary.json says ``running``, with when it ``started``
        and the server's ``pid`` and ``host``. Resuming, the summary also lists the
        earlier attempts (``earlier_attempts``: each one's status, as ``run_status`` tells
        it, and ``ATTEMPT_FIELDS``) and ``warnings_to_file`` appends to warnings.log."""
        earlier = self._attempts() if resume else []
        self.resuming = resume
        self.attempt = {
            "started": datetime.now().astimezone().isoformat(timespec="milliseconds"),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        if earlier:
            self.attempt["earlier_attempts"] = earlier
        _write_json_atomic(self.run_dir / SUMMARY, {"status": RUNNING, **self.attempt})

    def start(self, resume_after: int = 0) -> None:
        """Begin a run's records (``begin`` first, unless it was called): afresh, or,
        when resuming after round ``resume_after`` (summary.json's
        ``resumed_after_round``), keeping the rows up to that round (and dropping any
        that a killed run wrote for later rounds)."""
        if not self.attempt:
            self.begin()
        if resume_after:
            self.attempt["resumed_after_round"] = resume_after
            _write_json_atomic(self.run_dir / SUMMARY, {"status": RUNNING, **self.attempt})
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
        """While open, ``logger``'s warnings (not its errors) also go to warnings.log: in
        place of an earlier run's, or, resuming, after the earlier attempts' and a line
        naming this attempt (``RESUMED_MARK``)."""
        path = self.run_dir / WARNINGS
        if self.resuming:
            with path.open("a", encoding="utf-8") as handle:
                handle.write(
                    f"{RESUMED_MARK} at {self.attempt['started']} (pid {self.attempt['pid']} "
                    f"on {self.attempt['host']}); the lines above are earlier attempts' ---\n"
                )
        handler = logging.FileHandler(path, mode="a" if self.resuming else "w", encoding="utf-8")
        handler.addFilter(lambda record: record.levelno == logging.WARNING)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            handler.close()

    def finish(self, status: str, **figures: Any) -> None:
        """summary.json, written last: ``status`` is 'completed' only for a finished run,
        with this attempt's fields; then the tracker's summary (status and figures), and
        the tracker is closed."""
        try:
            _write_json_atomic(
                self.run_dir / SUMMARY, {"status": status, **self.attempt, **figures}
            )
        finally:
            tracker, self.tracker = self.tracker, None
            if tracker:
                tracker.finish({"status": status, **figures})

    def _attempts(self) -> list[dict[str, Any]]:
        """The attempts that summary.json records, oldest first (none without one), the
        last with its status as ``run_status`` tells it."""
        path = self.run_dir / SUMMARY
        if not path.exists():
            return []
        summary = json.loads(path.read_text(encoding="utf-8"))
        last = {"status": _status(summary)} | {
            k: summary[k] for k in ATTEMPT_FIELDS if k in summary
        }
        return [*summary.get("earlier_attempts", []), last]

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
