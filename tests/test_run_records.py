"""A run directory's record of its attempts: summary.json says ``running`` while the
server works, a killed run reads as interrupted, an interrupted server writes so
itself, and a resumed run lists the earlier attempts and appends to warnings.log."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedalora.launch import RunFollower
from fedalora.outputs import INTERRUPTED, RESUMED_MARK, RUNNING, SUMMARY, RunRecorder, run_status

APP = Path(__file__).resolve().parents[1]
LOGGER = logging.getLogger("test_run_records")

#: An attempt that warns, finishes round 1 and is killed with SIGKILL (kill -9).
KILLED = """
import logging, os, signal, sys
from fedalora.outputs import RunRecorder
recorder = RunRecorder(sys.argv[1])
recorder.begin()
logger = logging.getLogger("killed")
with recorder.warnings_to_file(logger):
    logger.warning("the killed attempt's warning")
    recorder.start()
    recorder.round_row({"round": 1})
    os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_attempt(run_dir: Path) -> None:
    process = subprocess.run([sys.executable, "-c", KILLED, str(run_dir)], cwd=APP, check=False)
    assert process.returncode == -9


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / SUMMARY).read_text())


def test_a_run_killed_mid_run_reads_as_interrupted(tmp_path):
    killed_attempt(tmp_path)
    assert summary(tmp_path)["status"] == RUNNING and summary(tmp_path)["pid"] != os.getpid()
    assert run_status(tmp_path) == INTERRUPTED

    live = RunRecorder(tmp_path / "live")
    live.start()
    assert run_status(live.run_dir) == RUNNING
    live.finish("completed", rounds=1)
    assert run_status(live.run_dir) == "completed" and summary(live.run_dir)["rounds"] == 1
    assert run_status(tmp_path / "none") is None


def test_a_reused_pid_is_not_the_run_and_another_hosts_run_cannot_be_checked(tmp_path):
    recorder = RunRecorder(tmp_path)
    recorder.begin()
    record = summary(tmp_path)
    (tmp_path / SUMMARY).write_text(json.dumps({**record, "started": "2000-01-01T00:00:00+00:00"}))
    assert run_status(tmp_path) == INTERRUPTED  # this process started after 2000
    (tmp_path / SUMMARY).write_text(json.dumps({**record, "pid": 1, "host": "elsewhere"}))
    assert run_status(tmp_path) == RUNNING


def test_a_resumed_run_appends_its_warnings_and_lists_the_interrupted_attempt(tmp_path):
    killed_attempt(tmp_path)
    killed = summary(tmp_path)
    echoed: list[str] = []
    follower = RunFollower(tmp_path, echoed.append)  # the console launcher of the resume

    resumed = RunRecorder(tmp_path)
    resumed.begin(resume=True)
    with resumed.warnings_to_file(LOGGER):
        LOGGER.warning("the resumed attempt's warning")
        resumed.start(resume_after=1)
        assert summary(tmp_path)["resumed_after_round"] == 1
        resumed.finish("completed", rounds=2)
    follower.poll()

    lines = (tmp_path / "warnings.log").read_text().splitlines()
    assert lines[0] == "the killed attempt's warning"
    assert lines[1].startswith(f"{RESUMED_MARK} at {resumed.attempt['started']} (pid {os.getpid()}")
    assert lines[2:] == ["the resumed attempt's warning"]
    warned = [line for line in echoed if line.startswith("warning: ")]
    assert warned == ["warning: the resumed attempt's warning"]
    record = summary(tmp_path)
    assert record["status"] == "completed" and record["resumed_after_round"] == 1
    assert record["earlier_attempts"] == [{"status": INTERRUPTED, "started": killed["started"]}]

    fresh = RunRecorder(tmp_path)
    fresh.begin()
    with fresh.warnings_to_file(LOGGER):
        LOGGER.warning("a fresh run's warning")
    assert (tmp_path / "warnings.log").read_text().splitlines() == ["a fresh run's warning"]
    assert "earlier_attempts" not in summary(tmp_path)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_the_server_records_its_own_interruption_and_a_resume_records_it(
    tmp_path, monkeypatch, stop
):
    """Ctrl-C (KeyboardInterrupt), or SIGTERM through Flower's handler (SystemExit),
    while the ServerApp runs; then the run is resumed (the federation itself replaced:
    this is about the run directory)."""
    import server.server_app
    from server.in_process import run_in_process

    def interrupted(grid, config, run_name, recorder):
        logging.getLogger("flwr").warning("before the interruption")
        raise stop

    def resumed(grid, config, run_name, recorder):
        recorder.start(resume_after=1)
        return {"rounds": 2, "resumed_after_round": 1}

    resume = "checkpoint=true state-store='disk'"
    monkeypatch.setattr(server.server_app, "run_federation", interrupted)
    with pytest.raises(stop):
        run_in_process(APP, "stopped", output_dir=tmp_path, run_config=resume)
    run_dir = tmp_path / "stopped"
    assert summary(run_dir)["status"] == run_status(run_dir) == INTERRUPTED
    assert summary(run_dir)["error"].startswith(stop.__name__)

    monkeypatch.setattr(server.server_app, "run_federation", resumed)
    run_in_process(APP, "stopped", output_dir=tmp_path, run_config=f"{resume} resume=true")
    record = summary(run_dir)
    assert record["status"] == "completed" and record["resumed_after_round"] == 1
    assert [a["status"] for a in record["earlier_attempts"]] == [INTERRUPTED]
    assert (run_dir / "warnings.log").read_text().splitlines()[0] == "before the interruption"
