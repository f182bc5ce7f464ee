"""A launched run seen from outside: its run-config checked before anything starts,
its progress followed from the files the ServerApp writes, and its outcome read from
``summary.json``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from ..outputs import (
    CONFIG,
    RESUMED_MARK,
    ROUNDS,
    SUMMARY,
    WARNINGS,
    RunRecorder,
    progress_line,
    run_status,
)
from ..run_config import parse_run_config, resolve_run_config


class SimulationFailed(RuntimeError):
    """The run did not write a completed summary.json."""


def check_run_config(app_dir: str | Path, run_config: str) -> None:
    """Check ``--run-config`` text before anything starts: text that is not key=value
    pairs, or a key the app does not declare (named with the closest declared key), is
    a ConfigError instead of Flower's bare "Invalid run configuration". The values are
    the ServerApp's to check (it reports them as the run's headline)."""
    resolve_run_config(app_dir, parse_run_config(run_config))


def refuse_run(run_dir: Path, exc: ConfigError) -> SystemExit:
    """A run stopped before it started: its summary.json says why, and the console's
    last line is the headline."""
    RunRecorder(run_dir).finish("failed", error=str(exc), error_key=exc.key)
    return SystemExit(f"run '{run_dir.name}' failed: {exc}")


class RunFollower:
    """Echoes a run's progress from its directory as the ServerApp writes it: one line
    per finished round (rounds.jsonl) and each of its warnings (warnings.log). Files left
    by an earlier run of the same name are skipped until the new run replaces them, and
    so are a resumed run's earlier attempts' warnings."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None]) -> None:
        self.run_dir, self.echo = run_dir, echo
        self.stale = {name: _identity(run_dir / name) for name in (ROUNDS, WARNINGS)}
        self.shown = dict.fromkeys(self.stale, 0)
        self.num_rounds: int | None = None

    def poll(self) -> None:
        for line in self._new_lines(WARNINGS):
            self.echo(f"warning: {line}")
        for line in self._new_lines(ROUNDS):
            self.echo(progress_line(json.loads(line), self._num_rounds()))

    def _num_rounds(self) -> int | None:
        """The run's num-server-rounds, from its config.json once the server wrote it."""
        if self.num_rounds is None and (self.run_dir / CONFIG).exists():
            self.num_rounds = json.loads((self.run_dir / CONFIG).read_text())["num-server-rounds"]
        return self.num_rounds

    def _new_lines(self, name: str) -> list[str]:
        path = self.run_dir / name
        if self.stale[name] is not None and _identity(path) == self.stale[name]:
            return []
        self.stale[name] = None
        if not path.exists():
            return []
        text = path.read_text(encoding="utf-8")
        complete = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
        if not self.shown[name]:  # a resumed run's warnings: this attempt's, after its mark
            marks = [i for i, line in enumerate(complete) if line.startswith(RESUMED_MARK)]
            self.shown[name] = marks[-1] + 1 if marks else 0
        new = complete[self.shown[name] :]
        self.shown[name] = len(complete)
        return [line for line in new if line.strip()]


def _identity(path: Path) -> tuple[int, int] | None:
    """A file's inode and modification time, None if it does not exist."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def completed_run(run_dir: Path, log_path: str | Path | None = None) -> Path:
    """``run_dir`` if its summary.json says completed; else SimulationFailed with why
    (``run_status``: a summary left ``running`` by a server that is gone is interrupted)."""
    status = run_status(run_dir)
    if status == "completed":
        return run_dir
    where = f"see {log_path}" if log_path else "see the output above"
    if status is None:
        raise SimulationFailed(f"run '{run_dir.name}' wrote no summary.json ({where})")
    error = json.loads((run_dir / SUMMARY).read_text()).get("error")
    raise SimulationFailed(f"run '{run_dir.name}' {status}: {error or f'not finished ({where})'}")
