"""The processes a launch starts: the environment they run in (their memory allocator
included), free ports, waiting for a SuperLink to answer, following a command's output,
and stopping a process tree by pid."""

from __future__ import annotations

import contextlib
import importlib.util
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


def runtime_env(allocator: str = "system") -> dict[str, str]:
    """This environment with the venv's bin first on PATH (Flower starts its runtime
    processes by name), no runtime dependency installs (offline) and ``allocator``'s
    settings (``allocator_env``)."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        **allocator_env(allocator),
    }


#: The memory allocators a launch can run its processes on.
ALLOCATORS = ("system", "jemalloc")
#: jemalloc keeps the pages a process frees for reuse (no decay): a node's peak recurs
#: every round, and returning pages to fault them in again costs time.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def allocator_env(allocator: str) -> dict[str, str]:
    """The environment that runs the processes a launch starts, and the Ray workers under
    them (``RAY_LD_PRELOAD_ON_WORKERS``), on ``allocator``: "system" (the C library's:
    nothing to set) or "jemalloc", which Ray ships and preloads into its own daemons.

    On CPU, glibc's allocator holds on to much of what a batched pass over many rows
    frees; jemalloc lowers the peak of a node hosting a cohort (at about the same step
    time in one process) but raises that of a node training one client
    (``benchmarks/RESULTS.md``, "Cohorts and the allocator"), so it is a choice for
    nodes that host cohorts. ValueError for an unknown allocator or one this machine
    lacks."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator {allocator!r}: choose one of {', '.join(ALLOCATORS)}")
    if allocator == "system":
        return {}
    ray = importlib.util.find_spec("ray")
    if ray is None or not ray.submodule_search_locations:
        raise ValueError("allocator 'jemalloc' is Ray's: Ray is not installed here")
    library = Path(ray.submodule_search_locations[0]) / "core" / "libjemalloc.so"
    if not library.is_file():
        raise ValueError(
            "allocator 'jemalloc': this Ray installation ships no libjemalloc.so "
            "(Ray's Linux wheels do); use the system allocator"
        )
    preloaded = os.environ.get("LD_PRELOAD", "")  # the user's own, kept after it
    return {
        "LD_PRELOAD": f"{library}:{preloaded}" if preloaded else str(library),
        "MALLOC_CONF": JEMALLOC_CONF,
        "RAY_LD_PRELOAD_ON_WORKERS": "1",
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
