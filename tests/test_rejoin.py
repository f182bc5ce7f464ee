"""A SuperNode that dies and comes back: ``fedalora.launch.deploy supernode`` waits while the
SuperLink still holds the dead node (same key, same node id), then rejoins the run; in a
real deployment (SuperLink and SuperNode processes with TLS and node authentication on
loopback) whose private state never leaves the nodes' own disks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from fedalora.launch.deploy import LocalDeployment, refusal, supervise_supernode
from fedalora.outputs import read_jsonl
from tests.test_deployment import APP, TINY

REFUSED = refusal().markers
#: Seconds between node 0's crash and its restart: well inside the time the SuperLink
#: holds a node that stopped sending heartbeats (``refusal().hold``).
RESTART_AFTER = 5
#: A stand-in for flower-supernode: refused (Flower's own exit lines, exit 1) while the
#: counter file holds a number above 0, which it counts down; then it prints and exits 0.
FAKE_SUPERNODE = f"""
import pathlib, sys
counter = pathlib.Path(sys.argv[1])
left = int(counter.read_text())
if left:
    counter.write_text(str(left - 1))
    print("ERROR :      {REFUSED[0]}\\nFailed to initialize the connection to the SuperLink.")
    print("{REFUSED[1]} Failed to activate SuperNode.", file=sys.stderr)
    sys.exit(1)
print("SuperNode ID: 42")
"""


def _fake(tmp_path: Path, refusals: int) -> list[str]:
    (tmp_path / "counter").write_text(str(refusals))
    return [sys.executable, "-c", FAKE_SUPERNODE, str(tmp_path / "counter")]


def test_a_refused_activation_is_retried_then_joins(tmp_path, capfd):
    assert supervise_supernode(_fake(tmp_path, 2), os.environ, 10, retry_every=0.1) == 0
    err = capfd.readouterr().err
    assert err.count("still holds this node from before it stopped") == 2
    assert err.count("Failed to activate SuperNode.") == 2 and "SuperNode ID: 42" in err
    assert (tmp_path / "counter").read_text() == "0"


def test_a_refusal_that_outlasts_the_rejoin_timeout_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="still refuses this SuperNode after 1 s: its key"):
        supervise_supernode(_fake(tmp_path, 100), os.environ, 1, retry_every=0.3)


def test_other_failures_are_not_retried(tmp_path):
    command = [sys.executable, "-c", "print('Exit Code: 305 [code: 2003]'); raise SystemExit(1)"]
    assert supervise_supernode(command, os.environ, 10, retry_every=0.1) == 1


def test_sigterm_goes_to_the_supernode_and_its_exit_status_comes_back(tmp_path):
    child = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(print('child: SIGTERM') or 3))\n"
        "print('SuperNode ID: 42', flush=True)\n"
        "time.sleep(60)\n"
    )
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys\nfrom fedalora.launch.deploy import supervise_supernode\n"
            f"sys.exit(supervise_supernode([sys.executable, '-c', {child!r}], os.environ))",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert supervisor.stderr is not None
    assert "SuperNode ID: 42" in supervisor.stderr.readline()
    supervisor.terminate()
    assert supervisor.wait(timeout=30) == 3
    assert "child: SIGTERM" in supervisor.stderr.read()


@pytest.mark.slow
def test_a_killed_supernode_rejoins_the_run_with_its_private_state(tmp_path):
    nodes = [{"partition-id": i, "num-partitions": 2, "lora-rank": r} for i, r in enumerate([8, 4])]
    started = time.monotonic()
    crashed: list[float] = []
    done = threading.Event()
    with LocalDeployment(tmp_path, nodes) as deployment:
        assert "--enable-supernode-auth" in deployment.processes["superlink"].args
        assert "--ssl-certfile" in deployment.processes["superlink"].args

        def crash_and_restart() -> None:
            """kill -9 node 0's processes right after it sent its round-1 update (so no
            message of round 2 has reached it: its next pull is 3 s later), restart it
            5 s later, while the SuperLink still holds it."""
            log = tmp_path / "node-0.log"
            while not done.wait(0.2):
                text = log.read_text(errors="replace")
                sent = text.find("Sending: train message")
                if sent >= 0 and "Sent successfully" in text[sent:]:
                    _kill_tree(deployment.processes.pop("node-0"))
                    crashed.append(time.time())
                    print(f"{time.monotonic() - started:5.0f} s  node 0 killed")
                    if not done.wait(RESTART_AFTER):
                        deployment.start_node(0)
                    return

        watcher = threading.Thread(target=crash_and_restart)
        watcher.start()
        # Round 2 either waits for node 0 (it rejoins before the SuperLink reports it gone
        # and takes its pending message) or fails without it (min-nodes=2) and is retried
        # until node 0 is back; no evaluation phases, which this test does not need.
        try:
            run_dir = deployment.run(
                APP,
                "rejoin",
                tmp_path / "server",
                f"{TINY} ranks='8,4' min-nodes=2 round-retries=3 num-server-rounds=2 "
                "fraction-evaluate=0 final-evaluation=false round-timeout=300",
                timeout=1200,
                progress=lambda line: print(f"{time.monotonic() - started:5.0f} s  {line}"),
            )
        finally:
            done.set()
            watcher.join()
        roots = [psutil.Process(process.pid) for process in deployment.processes.values()]
        ours = [*roots, *(child for root in roots for child in root.children(recursive=True))]
    print(f"{time.monotonic() - started:5.0f} s  run finished")
    assert not [p.pid for p in ours if _running(p)]  # the restarted node's tree stopped too

    assert crashed, "node 0 never sent its round-1 update"
    log = (tmp_path / "node-0.log").read_text(errors="replace")
    assert "still holds this node from before it stopped" in log  # refused, then retried
    assert log.count("SuperNode ID:") == 2  # activated before the crash and after it
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2] and not any(r.get("skipped") for r in rounds)
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["phase"] == "train"]
    # round 2 aggregated both clients (min-nodes=2): client 0 trained after its restart,
    # from the round-1 private state it had saved on its own disk before the crash
    assert {r["client"] for r in train if r["round"] == 2} == {0, 1}
    assert {r["private_state_round"] for r in train if r["client"] == 0} == {0, 1}
    state = tmp_path / "node-0"
    before, after = state / "client-0.round-1.safetensors", state / "client-0.round-2.safetensors"
    assert before.stat().st_mtime < crashed[0] < crashed[0] + RESTART_AFTER < after.stat().st_mtime
    # private factors live only in each node's own state-dir, never on the server side
    for i in range(2):
        assert {p.name for p in (tmp_path / f"node-{i}").iterdir()} == {
            f"client-{i}.round-1.safetensors",
            f"client-{i}.round-2.safetensors",
        }
    server_files = [p for p in (tmp_path / "server").rglob("*") if p.is_file()]
    assert not any("private" in str(p) or "client-" in p.name for p in server_files)
    shared = load_file(str(run_dir / "shared_state.safetensors"))
    assert shared and all(k.endswith(".B0") for k in shared)
    assert any(np.any(v != 0) for v in shared.values())
    checkpoint = load_file(str(run_dir / "checkpoint" / "shared-round-2.safetensors"))
    assert checkpoint.keys() == shared.keys()


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and everything under it at once (a crashed machine)."""
    root = psutil.Process(process.pid)
    tree = [root, *root.children(recursive=True)]
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(tree, timeout=10)
    process.wait()


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
