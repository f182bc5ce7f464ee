"""Run the Flower app as a Ray simulation on this machine, end to end, cleanly.

``flwr run .`` reuses whatever local SuperLink answers on its fixed port and leaves
it running. This launcher instead starts its own SuperLink (simulation mode, a free
port, a private FLWR_HOME, runtime dependency installs disabled for offline use),
runs ``flwr run <app> <connection> --stream``, checks the run's ``summary.json``,
and stops the SuperLink by its pid.

    python -m fedalora.launch.simulate --num-supernodes 8 --run-config "strategy='fedalora'"
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .connection import write_connection
from .processes import (
    ALLOCATORS,
    BIN,
    allocator_env,
    free_port,
    run_logged,
    runtime_env,
    stop_process_tree,
    wait_healthy,
)
from .runs import SimulationFailed, check_run_config, completed_run, refuse_run

CONNECTION = "fedalora-sim"


#: Flower's, Ray's and the clients' output, in the run directory.
FLOWER_LOG = "flower.log"


def run_simulation(
    app_dir: str | Path,
    run_name: str,
    *,
    num_supernodes: int = 8,
    run_config: str = "",
    output_dir: str | Path | None = None,
    num_cpus: int | None = None,
    num_gpus: float | None = None,
    ray_num_cpus: int | None = None,
    flwr_home: str | Path | None = None,
    timeout: float = 3600,
    log_path: str | Path | None = None,
    ray_address: str | None = None,
    progress: Callable[[str], None] | None = None,
    allocator: str = "system",
) -> Path:
    """Simulate ``num_supernodes`` nodes (one client each, or run-config ``num-clients``
    spread over them); return the run directory of a completed run.

    Flower's output goes to ``log_path`` (None: this console); ``progress`` receives a
    line per finished round and each warning of the ServerApp.

    ``run_config`` is extra ``--run-config`` text ("key=value key2='text'");
    ``num_cpus``/``num_gpus`` are the Ray resources of each node's ClientApp actor, and
    ``ray_num_cpus`` the CPUs a fresh Ray instance declares (Flower takes whole CPUs per
    actor, so 8 actors on 2 cores are ``ray_num_cpus=16, num_cpus=2``). ``ray_address``
    runs the clients on an existing Ray cluster (``ray start --head``; "auto" or
    "host:port") instead of a fresh one-machine Ray instance per run. ``allocator``
    ("system" or "jemalloc", ``processes.allocator_env``) is the memory allocator of the
    SuperLink, the simulation and a fresh Ray instance's workers (an existing cluster's
    workers keep the one it was started with).
    """
    app_dir = Path(app_dir).resolve()
    output_dir = Path(output_dir or app_dir / "outputs").resolve()
    flwr_home = Path(flwr_home or app_dir / ".flwr-home").resolve()
    check_run_config(app_dir, run_config)
    port = free_port()
    write_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}", ca=None)
    env = {**runtime_env(allocator), "FLWR_HOME": str(flwr_home)}
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
        if ray_num_cpus is not None:
            federation.append(f"init-args-num-cpus={int(ray_num_cpus)}")
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
        "--allocator",
        choices=ALLOCATORS,
        default="system",
        help="the memory allocator of the run's processes and of a new Ray instance's workers "
        "(not an existing --ray-address cluster's): jemalloc for nodes hosting cohorts on CPU "
        "(lower peak memory; higher for one client per node)",
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
    try:
        allocator_vars = allocator_env(args.allocator)
    except ValueError as exc:
        parser.error(f"--allocator: {exc}")
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
            env = {**os.environ, **allocator_vars}
            run_logged(command, app_dir, env, 24 * 3600, log_path, run_dir, progress)
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
                allocator=args.allocator,
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
