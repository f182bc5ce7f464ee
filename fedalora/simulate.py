"""Run the Flower app as a Ray simulation on this machine, end to end, cleanly.

``flwr run .`` reuses whatever local SuperLink answers on its fixed port and leaves
it running. This launcher instead starts its own SuperLink (simulation mode, a free
port, a private FLWR_HOME, runtime dependency installs disabled for offline use),
runs ``flwr run <app> <connection> --stream``, checks the run's ``summary.json``,
and stops the SuperLink by its pid.

    python -m fedalora.simulate --num-supernodes 8 --run-config "strategy='fedalora'"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from fedalora.errors import ConfigError
from fedalora.outputs import (
    CONFIG,
    RESUMED_MARK,
    ROUNDS,
    SUMMARY,
    WARNINGS,
    RunRecorder,
    progress_line,
    run_status,
)
from fedalora.run_config import parse_run_config, resolve_run_config

CONNECTION = "fedalora-sim"
#: Flower's, Ray's and the clients' output, in the run directory.
FLOWER_LOG = "flower.log"
BIN = Path(sys.executable).parent  # flwr, flower-superlink, ray of this environment


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


def run_simulation(
    app_dir: str | Path,
    run_name: str,
    *,
    num_supernodes: int = 8,
    run_config: str = "",
    output_dir: str | Path | None = None,
    num_cpus: int | None = None,
    num_gpus: float | None = None,
    flwr_home: str | Path | None = None,
    timeout: float = 3600,
    log_path: str | Path | None = None,
    ray_address: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Simulate ``num_supernodes`` clients; return the run directory of a completed run.

    Flower's output goes to ``log_path`` (None: this console); ``progress`` receives a
    line per finished round and each warning of the ServerApp.

    ``run_config`` is extra ``--run-config`` text ("key=value key2='text'");
    ``num_cpus``/``num_gpus`` are the Ray resources of each client. ``ray_address``
    runs the clients on an existing Ray cluster (``ray start --head``; "auto" or
    "host:port") instead of a fresh one-machine Ray instance per run.
    """
    app_dir = Path(app_dir).resolve()
    output_dir = Path(output_dir or app_dir / "outputs").resolve()
    flwr_home = Path(flwr_home or app_dir / ".flwr-home").resolve()
    check_run_config(app_dir, run_config)
    port = free_port()
    write_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}", ca=None)
    env = {**runtime_env(), "FLWR_HOME": str(flwr_home)}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address  # read by ray.init() in the simulation process
    superlink = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
        cwd=app_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", superlink)
        federation = [f"num-supernodes={num_supernodes}"]
        if num_cpus is not None:
            federation.append(f"client-resources-num-cpus={int(num_cpus)}")
        if num_gpus is not None:
            federation.append(f"client-resources-num-gpus={num_gpus}")
        command = [
            str(BIN / "flwr"),
            "run",
            str(app_dir),
            CONNECTION,
            "--stream",
            "--federation-config",
            " ".join(federation),
            "--run-config",
            f"run-name='{run_name}' output-dir='{output_dir}'",
        ]
        if run_config.strip():
            command += ["--run-config", run_config]
        run_logged(command, app_dir, env, timeout, log_path, output_dir / run_name, progress)
    finally:
        stop_process_tree(superlink)
    return completed_run(output_dir / run_name, log_path)


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


@contextlib.contextmanager
def ray_cluster(
    num_cpus: int | None = None, worker_nodes: int = 0, timeout: float = 120
) -> Iterator[str]:
    """A Ray cluster on this machine for runs to join: a head on a free loopback port
    and ``worker_nodes`` more Ray nodes joining it (each with ``num_cpus``), the same
    ``ray start`` commands as on several machines; yields the head's address.

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


def runtime_env() -> dict[str, str]:
    """This environment with the venv's bin first on PATH (Flower starts its runtime
    processes by name) and no runtime dependency installs (offline)."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def connection_toml(name: str, address: str, ca: Path | None) -> str:
    """A ``flwr`` CLI connection to the SuperLink at ``address`` (``ca`` None: insecure)."""
    trust = "insecure = true" if ca is None else f'root-certificates = "{ca.resolve()}"'
    return f'[superlink.{name}]\naddress = "{address}"\n{trust}\n'


def write_connection(flwr_home: Path, name: str, address: str, ca: Path | None) -> None:
    """A private FLWR_HOME whose default connection is ``name``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n' + connection_toml(name, address, ca)
    )


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


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", default=".", help="the Flower app directory")
    parser.add_argument("--run-name", default=time.strftime("run-%Y%m%d-%H%M%S"))
    parser.add_argument("--num-supernodes", type=int, default=8)
    parser.add_argument("--run-config", default="", help="e.g. \"strategy='fedalora' ranks='8'\"")
    parser.add_argument("--output-dir", default=None, help="default: <app>/outputs")
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs per client")
    parser.add_argument("--num-gpus", type=float, default=None, help="Ray GPUs per client")
    parser.add_argument(
        "--ray-address",
        default=None,
        help="an existing Ray cluster ('auto' or host:port); default: a new one",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"show Flower's, Ray's and the clients' output here instead of in <run>/{FLOWER_LOG}",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="no SuperLink and no Ray: the same apps with messages delivered in one process "
        "(server.in_process), the same results",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_signal)  # so that the SuperLink is stopped too
    started = time.perf_counter()
    output_dir = Path(args.output_dir or Path(args.app) / "outputs").resolve()
    run_dir = output_dir / args.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        check_run_config(args.app, args.run_config)
    except ConfigError as exc:
        raise refuse_run(run_dir, exc) from None
    log_path = None if args.verbose else run_dir / FLOWER_LOG
    progress = None if args.verbose else _echo
    if not args.verbose:
        print(f"run '{args.run_name}': Flower's log in {log_path}")
    try:
        if args.in_process:
            command = [
                sys.executable,
                "-m",
                "server.in_process",
                "--app",
                args.app,
                "--run-name",
                args.run_name,
                "--num-supernodes",
                str(args.num_supernodes),
                "--run-config",
                args.run_config,
                "--output-dir",
                str(output_dir),
            ]
            app_dir = Path(args.app).resolve()
            run_logged(command, app_dir, dict(os.environ), 24 * 3600, log_path, run_dir, progress)
            completed_run(run_dir, log_path)
        else:
            run_simulation(
                args.app,
                args.run_name,
                num_supernodes=args.num_supernodes,
                run_config=args.run_config,
                output_dir=output_dir,
                num_cpus=args.num_cpus,
                num_gpus=args.num_gpus,
                ray_address=args.ray_address,
                timeout=24 * 3600,
                log_path=log_path,
                progress=progress,
            )
    except SimulationFailed as exc:
        raise SystemExit(str(exc)) from None
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"completed in {time.perf_counter() - started:.0f} s: {run_dir}")
    print(json.dumps(summary, indent=2))


def _echo(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    main()
