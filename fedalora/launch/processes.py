"""The processes a launch starts: the environment they run in, free ports, waiting for
a SuperLink to answer, following a command's output, and stopping a process tree by
pid."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

from .runs import RunFollower, SimulationFailed

BIN = Path(sys.executable).parent  # flwr, flower-superlink, ray of this environment


def run_logged(
    command: list[str],
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    log_path: str | Path | None,
    run_dir: Path,
    progress: Callable[[str], None] | None,
) -> None:
    """Run ``command`` with its output in ``log_path`` (None: this console); with
    ``progress``, echo the run's rounds and warnings while it runs (``RunFollower``)."""
    follower = RunFollower(run_dir, progress) if progress else None
    with open(log_path or os.devnull, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=None if log_path is None else log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                stop_process_tree(process)
                raise SimulationFailed(f"the run took longer than {timeout:.0f} s")
            if follower:
                follower.poll()
            time.sleep(1.0)
    if follower:
        follower.poll()


def runtime_env() -> dict[str, str]:
    """This environment with the venv's bin first on PATH (Flower starts its runtime
    processes by name) and no runtime dependency installs (offline)."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(
    url: str, process: subprocess.Popen, timeout: float = 60, context: ssl.SSLContext | None = None
) -> None:
    """Wait until the SuperLink answers ``<url>/health`` (``context``: its TLS trust)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationFailed(f"flower-superlink exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1, context=context) as reply:  # noqa: S310 - our own http(s) SuperLink
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SimulationFailed(f"flower-superlink did not become healthy within {timeout:.0f} s")


def stop_process_tree(process: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process and every process under it, whatever their session (the SuperLink
    starts its SuperExec detached, and the SuperExec the ServerApp or simulation):
    SIGTERM, then SIGKILL for whatever is left after ``timeout`` seconds."""
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=timeout)
    process.wait()
