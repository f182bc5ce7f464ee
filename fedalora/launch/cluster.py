"""A Ray cluster on this machine for simulations to join."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .processes import BIN, free_port, runtime_env, stop_process_tree
from .runs import SimulationFailed


@contextlib.contextmanager
def ray_cluster(
    num_cpus: int | None = None,
    worker_nodes: int = 0,
    timeout: float = 120,
    allocator: str = "system",
) -> Iterator[str]:
    """A Ray cluster on this machine for runs to join: a head on a free loopback port
    and ``worker_nodes`` more Ray nodes joining it (each with ``num_cpus``), the same
    ``ray start`` commands as on several machines; yields the head's address. Its workers
    run on ``allocator`` (``processes.allocator_env``).

    Each node is a ``ray start --block`` process of ours with its Ray daemons under it;
    on exit those processes and everything under them are stopped by pid, and no other
    Ray process of the user is touched. The cluster keeps its files in a temporary
    directory of its own, so it never becomes the cluster that a later ``ray.init()``
    without an address would join (``/tmp/ray/ray_current_cluster``).
    """
    address = f"127.0.0.1:{free_port()}"
    cpus = [] if num_cpus is None else ["--num-cpus", str(num_cpus)]
    commands = [["--head", "--port", address.split(":")[1], "--include-dashboard", "false"]]
    commands += [["--address", address]] * worker_nodes
    env = runtime_env(allocator)
    nodes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="fedalora-ray-") as temp_dir:
        try:
            for index, command in enumerate(commands):
                log = Path(temp_dir) / f"node-{index}.log"
                with log.open("w") as handle:
                    nodes.append(
                        subprocess.Popen(
                            [
                                str(BIN / "ray"),
                                "start",
                                "--block",
                                *command,
                                "--node-ip-address",
                                "127.0.0.1",
                                "--disable-usage-stats",
                                "--temp-dir",
                                temp_dir,
                                *cpus,
                            ],
                            env=env,
                            stdout=handle,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
                _wait_for_line(log, "Ray runtime started", nodes[-1], timeout)
            yield address
        finally:
            for node in reversed(nodes):
                stop_process_tree(node)


def _wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    """Wait until ``process`` writes ``text`` to ``log``; SimulationFailed if it exits or
    takes longer than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SimulationFailed(
                f"'ray start' did not start a node: {log.read_text(errors='replace')[-2000:]}"
            )
        time.sleep(0.2)
